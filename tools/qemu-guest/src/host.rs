//! The host side of the test guest: build its image (cached under `target/`), boot VMs
//! of it with their RAM in a shared file, and read their consoles. Used by the tests and
//! the benchmark; std only, like the rest of this crate.

use crate::Heartbeat;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// QEMU's oldest version with what the appliance needs.
pub const MIN_QEMU_MAJOR: u64 = 9;

/// The guest's kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel (Debian's cloud kernel).
    pub kernel: PathBuf,
    /// busybox and the workload.
    pub initramfs: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// QEMU's major version, if it is installed.
pub fn qemu_major() -> Option<u64> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(3)?;
    version.split('.').next()?.parse().ok()
}

impl GuestImage {
    /// The image, built when its sources changed; `Err` says why it cannot be (QEMU or
    /// the kernel missing: `make deps` installs them).
    pub fn prepare() -> Result<GuestImage, String> {
        match qemu_major() {
            Some(major) if major >= MIN_QEMU_MAJOR => {}
            Some(major) => {
                return Err(format!(
                    "QEMU {major} is installed; ≥ {MIN_QEMU_MAJOR} is needed (make deps)"
                ));
            }
            None => return Err("qemu-system-x86_64 is not installed (make deps)".into()),
        }
        let script = repo_root().join("tools/qemu-guest/build-image.sh");
        let out = Command::new(&script)
            .output()
            .map_err(|e| format!("{}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "building the guest image: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        Ok(GuestImage {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
        })
    }
}

/// How a VM's RAM is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamBacking {
    /// A shared file: what the appliance migrates.
    SharedFile,
    /// A private file mapping (`share=off`): refused by the appliance.
    PrivateFile,
    /// Plain `-m`: refused by the appliance.
    Anonymous,
}

/// A VM to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Its name (`-name`), also in its file names.
    pub name: String,
    /// RAM, MiB.
    pub memory_mib: u64,
    /// The workload's settings, as kernel arguments (`dwcp.mib=... dwcp.rate=...`).
    pub workload: String,
    /// Wait for an incoming migration (`-incoming defer`).
    pub incoming: bool,
    /// How the RAM is backed.
    pub ram: RamBacking,
    /// Start with the vCPUs stopped (`-S`).
    pub stopped: bool,
    /// Where its sockets and console log go.
    pub dir: PathBuf,
    /// Run QEMU inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Where the RAM file goes (a tmpfs or hugetlbfs directory; `/dev/shm` if unset).
    pub ram_dir: Option<PathBuf>,
}

/// A running QEMU VM, killed (and its RAM file removed) when dropped.
pub struct Vm {
    child: Child,
    /// Its QMP socket (for the appliance).
    pub qmp: PathBuf,
    /// A second QMP socket, for whoever watches (a QMP socket serves one client at a
    /// time).
    pub observer_qmp: PathBuf,
    /// Its console log.
    pub serial: PathBuf,
    /// Its RAM file.
    pub memory_file: PathBuf,
}

impl Vm {
    /// Boot `spec` from `image`. The source and destination of a migration must be
    /// booted with the same image and sizes.
    pub fn boot(image: &GuestImage, spec: &VmSpec) -> Result<Vm, String> {
        std::fs::create_dir_all(&spec.dir).map_err(|e| e.to_string())?;
        let qmp = spec.dir.join(format!("{}.qmp", spec.name));
        let observer_qmp = spec.dir.join(format!("{}.observer.qmp", spec.name));
        let serial = spec.dir.join(format!("{}.console", spec.name));
        let memory_file = spec
            .ram_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/dev/shm"))
            .join(format!("dwcp-vm-{}-{}", spec.name, std::process::id()));
        for f in [&qmp, &observer_qmp, &serial, &memory_file] {
            let _ = std::fs::remove_file(f);
        }
        let mut args: Vec<String> = Vec::new();
        let mut arg = |a: &str| args.push(a.to_string());
        arg("-name");
        arg(&spec.name);
        for a in [
            "-nodefaults",
            "-no-user-config",
            "-accel",
            "tcg",
            "-display",
            "none",
        ] {
            arg(a);
        }
        arg("-m");
        arg(&format!("{}M", spec.memory_mib));
        match spec.ram {
            RamBacking::Anonymous => {
                arg("-machine");
                arg("pc");
            }
            shared => {
                arg("-machine");
                arg("pc,memory-backend=ram0");
                arg("-object");
                arg(&format!(
                    "memory-backend-file,id=ram0,size={}M,mem-path={},share={}",
                    spec.memory_mib,
                    memory_file.display(),
                    if shared == RamBacking::SharedFile {
                        "on"
                    } else {
                        "off"
                    }
                ));
            }
        }
        arg("-kernel");
        arg(&image.kernel.display().to_string());
        arg("-initrd");
        arg(&image.initramfs.display().to_string());
        arg("-append");
        arg(&format!("console=ttyS0 quiet panic=-1 {}", spec.workload));
        arg("-serial");
        arg(&format!("file:{}", serial.display()));
        arg("-qmp");
        arg(&format!("unix:{},server=on,wait=off", qmp.display()));
        arg("-qmp");
        arg(&format!(
            "unix:{},server=on,wait=off",
            observer_qmp.display()
        ));
        arg("-no-reboot");
        if spec.incoming {
            arg("-incoming");
            arg("defer");
        }
        if spec.stopped {
            arg("-S");
        }
        let mut command = match &spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting QEMU: {e}"))?;
        let vm = Vm {
            child,
            qmp,
            observer_qmp,
            serial,
            memory_file,
        };
        // The QMP socket appears once QEMU has set up the machine.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !vm.qmp.exists() || !vm.observer_qmp.exists() {
            if Instant::now() > deadline {
                return Err(format!("QEMU never opened {}", vm.qmp.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(vm)
    }

    /// Everything the guest printed so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The heartbeats printed so far.
    pub fn heartbeats(&self) -> Vec<Heartbeat> {
        self.console()
            .lines()
            .filter_map(Heartbeat::parse)
            .collect()
    }

    /// Wait until `accept` holds for a heartbeat; returns it.
    pub fn wait_for_heartbeat(
        &self,
        timeout: Duration,
        accept: impl Fn(&Heartbeat) -> bool,
    ) -> Result<Heartbeat, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(beat) = self.heartbeats().into_iter().rev().find(|b| accept(b)) {
                return Ok(beat);
            }
            if Instant::now() > deadline {
                let console = self.console();
                let tail: Vec<&str> = console.lines().rev().take(5).collect();
                return Err(format!(
                    "no such heartbeat within {timeout:?}; console ends: {tail:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether QEMU has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.memory_file);
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.observer_qmp);
    }
}
