//! Named network namespaces (the `ip netns` convention: a bind mount under
//! `/run/netns/`), TUN devices created inside them, and the janitor process that
//! removes the namespaces when the emulator dies, however it dies.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Runs `ip ARGS`, returning its error output when it fails.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

pub fn create(name: &str) -> Result<(), String> {
    ip(&["netns", "add", name])
}

/// Removes a named namespace; a missing one is not an error. Processes still inside
/// it keep it alive (unnamed) until they exit.
pub fn delete(name: &str) {
    if exists(name) {
        let _ = ip(&["netns", "del", name]);
    }
}

/// Moves the calling thread into the named namespace. Sockets it creates afterwards,
/// and threads it spawns, belong to that namespace.
pub fn enter(name: &str) -> io::Result<()> {
    let file = File::open(path(name))?;
    // SAFETY: setns on a valid namespace fd only changes the calling thread's network
    // namespace; the fd outlives the call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `work` on a thread inside the named namespace, leaving the caller's alone.
pub fn run_in<T: Send>(name: &str, work: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(name)?;
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace worker panicked")))
    })
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TUN device (IP packets, no extra header), non-blocking.
pub struct Tun {
    fd: OwnedFd,
    pub name: String,
}

impl Tun {
    /// Creates `device` inside the named namespace. The device lives as long as this fd
    /// (or the namespace, whichever goes first).
    pub fn create_in(namespace: &str, device: &str) -> io::Result<Tun> {
        if device.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "device name too long",
            ));
        }
        let fd = run_in(namespace, || {
            let path = c"/dev/net/tun";
            // SAFETY: plain open of a NUL-terminated path.
            let raw = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh fd we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut request = InterfaceRequest {
                name: [0; libc::IFNAMSIZ],
                flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
                _pad: [0; 22],
            };
            request.name[..device.len()].copy_from_slice(device.as_bytes());
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
            // `InterfaceRequest` lays out (40 bytes); it lives across the call.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut request) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(fd)
        })?;
        Ok(Tun {
            fd,
            name: device.to_string(),
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A child process that outlives us only to clean up: it waits for the pipe from us
/// to close — which happens when we exit, crash or are killed with SIGKILL — then
/// unmounts and removes the named namespaces and removes the listed files.
///
/// It is forked (not exec'd) and only makes system calls after the fork, so it is safe
/// in a multi-threaded process; it starts its own session so a terminal's Ctrl-C does
/// not take it down with us.
pub struct Janitor {
    pipe: Option<OwnedFd>,
    pid: libc::pid_t,
}

impl Janitor {
    pub fn spawn(namespaces: &[&str], files: &[PathBuf]) -> io::Result<Janitor> {
        // Everything the child needs is prepared before the fork: it must not allocate.
        let to_c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
        let mounts: Vec<CString> = namespaces
            .iter()
            .map(|n| to_c(&path(n)))
            .collect::<Result<_, _>>()?;
        let files: Vec<CString> = files.iter().map(|p| to_c(p)).collect::<Result<_, _>>()?;
        let mount_ptrs: Vec<*const libc::c_char> = mounts.iter().map(|c| c.as_ptr()).collect();
        let file_ptrs: Vec<*const libc::c_char> = files.iter().map(|c| c.as_ptr()).collect();
        let mut ends = [0; 2];
        // SAFETY: pipe2 fills the two-element array.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let (read_end, write_end) = (ends[0], ends[1]);
        // SAFETY: the child runs only async-signal-safe system calls on data prepared
        // above and ends with `_exit`; the parent continues normally.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let error = io::Error::last_os_error();
            // SAFETY: both fds are ours and not yet owned elsewhere.
            unsafe {
                libc::close(read_end);
                libc::close(write_end);
            }
            return Err(error);
        }
        if pid == 0 {
            // SAFETY: see above; this branch never returns.
            unsafe { janitor_child(read_end, &mount_ptrs, &file_ptrs) }
        }
        // SAFETY: the parent owns both ends; it keeps the write end only.
        unsafe { libc::close(read_end) };
        // SAFETY: `write_end` is a valid fd owned by nobody else.
        let pipe = unsafe { OwnedFd::from_raw_fd(write_end) };
        Ok(Janitor {
            pipe: Some(pipe),
            pid,
        })
    }
}

/// # Safety
/// Must only run in a freshly forked child; calls nothing but system calls.
unsafe fn janitor_child(
    pipe: RawFd,
    mounts: &[*const libc::c_char],
    files: &[*const libc::c_char],
) -> ! {
    // SAFETY: system calls only, on fds and C strings the parent prepared before the
    // fork (the child shares nothing that another thread could be mutating).
    unsafe {
        libc::setsid();
        // A forked child shares its parent's command line, so `pkill -f <parent>`
        // signals it too: ignore the polite signals, leave only the pipe (and SIGKILL)
        // to end it.
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::signal(signal, libc::SIG_IGN);
        }
        // Keep only the pipe: no stray copies of the parent's sockets or devices.
        if pipe > 3 {
            libc::syscall(libc::SYS_close_range, 0, pipe - 1, 0);
        } else {
            for fd in 0..pipe {
                libc::close(fd);
            }
        }
        libc::syscall(libc::SYS_close_range, pipe + 1, u32::MAX, 0);
        let mut byte = 0u8;
        loop {
            let n = libc::read(pipe, (&mut byte as *mut u8).cast(), 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        for &mount in mounts {
            libc::umount2(mount, libc::MNT_DETACH);
            libc::unlink(mount);
        }
        for &file in files {
            libc::unlink(file);
        }
        libc::_exit(0)
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        // Closing the pipe sets the janitor to work; whatever is left, it removes.
        self.pipe.take();
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}
