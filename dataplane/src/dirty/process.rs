//! Writes another process makes to a shared memory file, tracked in that process's own
//! page tables.
//!
//! A QEMU guest's RAM is a file QEMU maps shared; the guest writes it with stores
//! through QEMU's page tables, which nothing in this process can see, so without help
//! the only dirty log is a CRC rescan of the whole file. But a userfaultfd belongs to
//! the address space it was created in and acts on that one whoever holds the
//! descriptor (`UFFDIO_*` ioctls use the context's `mm`; `/proc/PID/pagemap`'s
//! `PAGEMAP_SCAN` walks the target's). So this module:
//! 1. stops the writer's main thread with `PTRACE_SEIZE` + `PTRACE_INTERRUPT`;
//! 2. has it execute `userfaultfd()` on a `syscall` instruction already in its memory
//!    (the one it stopped after, or one in its vDSO), its registers saved and restored,
//!    so the system call it was in restarts as if it had taken a signal;
//! 3. copies the new descriptor with `pidfd_getfd`, has the writer close its own copy,
//!    and lets it go (the thread is stopped for well under a millisecond);
//! 4. hands the descriptor, the mapping's address in the writer and the writer's
//!    `/proc/PID/pagemap` to [`UffdDirtyLog`].
//!
//! From then on the kernel records the writer's writes exactly as it does this
//! process's own, including a kernel thread's writes through the writer's address
//! space (vhost). A KVM guest's writes should be too (write-protecting a page
//! invalidates its secondary-MMU entry, and KVM's next write fault goes through the
//! writer's page table), but KVM cannot run a guest on these machines to show it.
//! Changes that do not go through the writer's page tables are not seen: `write(2)` or
//! a hole punched in the file (a balloon discarding pages), or a second process mapping
//! it (a vhost-user back end). [`open_process_dirty_log`] refuses when another process
//! maps the file writable; the rest is for `verify = "audit"` to catch.
//! Dropping the log (or this process dying) unregisters the range, which removes the
//! write protection; the writer never notices.
//!
//! Needs `CAP_SYS_PTRACE` over the writer (root here) and Linux ≥ 6.7.

use super::uffd::UFFD_USER_MODE_ONLY;
use super::{DirtyLogError, UffdDirtyLog};
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The x86-64 `syscall` instruction.
const SYSCALL_INSTRUCTION: [u8; 2] = [0x0f, 0x05];

fn unavailable(why: String) -> DirtyLogError {
    DirtyLogError::UffdUnavailable(why)
}

/// Start tracking the writes process `pid` makes through its shared mapping of `file`
/// (all `len` bytes of it, mapped once, from offset 0).
pub fn open_process_dirty_log(
    pid: u32,
    file: &Path,
    len: u64,
) -> Result<UffdDirtyLog, DirtyLogError> {
    if !cfg!(target_arch = "x86_64") {
        return Err(unavailable(
            "tracking another process's writes is implemented for x86-64 only".into(),
        ));
    }
    let meta =
        std::fs::metadata(file).map_err(|e| unavailable(format!("{}: {e}", file.display())))?;
    let identity = FileIdentity {
        device: meta.dev(),
        inode: meta.ino(),
    };
    let base = mapping_of(pid, identity, len)?;
    if let Some(other) = other_writable_mapper(identity, pid)? {
        return Err(unavailable(format!(
            "{other} also maps {} writable; its writes would go unseen",
            file.display()
        )));
    }
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| unavailable(format!("/proc/{pid}/pagemap: {e}")))?;
    let uffd = borrow_userfaultfd(pid)?;
    UffdDirtyLog::for_address_space(uffd, pagemap, base, len)
}

/// A file as `/proc/PID/maps` names it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
}

/// One line of `/proc/PID/maps` that maps a file.
struct FileMapping {
    start: u64,
    end: u64,
    shared_writable: bool,
    offset: u64,
    file: FileIdentity,
}

/// The `start-end` field of a `/proc/PID/maps` line.
fn parse_address_range(field: &str) -> Option<(u64, u64)> {
    let (start, end) = field.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

/// Parse one `/proc/PID/maps` line (`start-end perms offset major:minor inode path`);
/// `None` for anonymous mappings and lines that do not parse.
fn parse_maps_line(line: &str) -> Option<FileMapping> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = parse_address_range(fields.next()?)?;
    let perms = fields.next()?.as_bytes();
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode: u64 = fields.next()?.parse().ok()?;
    if inode == 0 || perms.len() < 4 {
        return None;
    }
    let (major, minor) = (
        u64::from_str_radix(major, 16).ok()?,
        u64::from_str_radix(minor, 16).ok()?,
    );
    Some(FileMapping {
        start,
        end,
        shared_writable: perms[1] == b'w' && perms[3] == b's',
        offset,
        file: FileIdentity {
            device: libc::makedev(major as u32, minor as u32),
            inode,
        },
    })
}

/// Where `pid` maps all of `file`: one shared writable span (perhaps several adjacent
/// areas) from offset 0 over `len` bytes, and no other mapping of it.
fn mapping_of(pid: u32, file: FileIdentity, len: u64) -> Result<u64, DirtyLogError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| unavailable(format!("/proc/{pid}/maps: {e}")))?;
    let areas: Vec<FileMapping> = maps
        .lines()
        .filter_map(parse_maps_line)
        .filter(|m| m.file == file)
        .collect();
    let Some(first) = areas.first() else {
        return Err(unavailable(format!(
            "process {pid} does not map the memory file"
        )));
    };
    let contiguous = areas.windows(2).all(|pair| {
        pair[1].start == pair[0].end
            && pair[1].offset == pair[0].offset + (pair[0].end - pair[0].start)
    });
    let spanned = areas.last().map_or(0, |last| last.end - first.start);
    if !contiguous || first.offset != 0 || spanned != len {
        return Err(unavailable(format!(
            "process {pid} maps the memory file in {} pieces that are not one span of \
             its {len} bytes",
            areas.len()
        )));
    }
    if !areas.iter().all(|m| m.shared_writable) {
        return Err(unavailable(format!(
            "process {pid} does not map the memory file shared and writable"
        )));
    }
    Ok(first.start)
}

/// Another process than `writer` and this one that maps `file` shared and writable,
/// described for a message.
fn other_writable_mapper(file: FileIdentity, writer: u32) -> Result<Option<String>, DirtyLogError> {
    let me = std::process::id();
    let proc = std::fs::read_dir("/proc").map_err(|e| unavailable(format!("/proc: {e}")))?;
    for entry in proc.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == writer || pid == me {
            continue;
        }
        // Processes that exit meanwhile, or kernel threads, have nothing to read.
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        let maps_it = maps
            .lines()
            .filter_map(parse_maps_line)
            .any(|m| m.file == file && m.shared_writable);
        if maps_it {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            return Ok(Some(format!("process {pid} ({})", comm.trim())));
        }
    }
    Ok(None)
}

/// Wait for tracee `tid`'s next stop and return the signal it stopped with (`SIGTRAP`
/// for an interrupt's event stop and for a finished single step).
fn wait_stop(tid: libc::pid_t) -> Result<libc::c_int, DirtyLogError> {
    let mut status = 0;
    // SAFETY: waiting for our own tracee; `status` is a valid out pointer.
    let waited = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    if waited != tid {
        return Err(unavailable(format!(
            "waiting for process {tid} to stop: {}",
            std::io::Error::last_os_error()
        )));
    }
    if !libc::WIFSTOPPED(status) {
        return Err(unavailable(format!(
            "process {tid} ended while stopped for ptrace (status {status:#x})"
        )));
    }
    Ok(libc::WSTOPSIG(status))
}

/// The registers of stopped tracee `tid`.
fn registers(tid: libc::pid_t) -> Result<libc::user_regs_struct, DirtyLogError> {
    // SAFETY: all-zero is a valid user_regs_struct; PTRACE_GETREGS fills it.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: the tracee is stopped; `regs` is a valid out pointer of the right type.
    if unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs) } != 0 {
        return Err(unavailable(format!(
            "ptrace(GETREGS): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(regs)
}

/// A thread stopped under ptrace; dropping it puts its registers back and lets it go
/// (with a signal that arrived meanwhile, so none is lost).
struct StoppedThread {
    tid: libc::pid_t,
    saved: libc::user_regs_struct,
    pending_signal: libc::c_int,
}

impl StoppedThread {
    /// Seize `tid` and wait for it to stop.
    fn stop(tid: libc::pid_t) -> Result<StoppedThread, DirtyLogError> {
        // SAFETY: ptrace requests with integer arguments; results are checked.
        if unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) } != 0 {
            return Err(unavailable(format!(
                "ptrace(SEIZE) of process {tid}: {} (needs CAP_SYS_PTRACE over it, and \
                 no other tracer)",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: as above; `tid` is now our tracee.
        if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: detaching a tracee we seized.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
            return Err(unavailable(format!("ptrace(INTERRUPT) of {tid}: {e}")));
        }
        // Until the registers are saved there is nothing to put back: a failure only
        // lets the thread go.
        let detach = |e: DirtyLogError| {
            // SAFETY: detaching a tracee we seized, without touching its registers.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
            e
        };
        let signal = wait_stop(tid).map_err(detach)?;
        let saved = registers(tid).map_err(detach)?;
        Ok(StoppedThread {
            tid,
            saved,
            // A signal's stop that came before the interrupt's is delivered when we
            // let go (the interrupt's stop, if it still comes, is stepped over below).
            pending_signal: if signal == libc::SIGTRAP { 0 } else { signal },
        })
    }

    fn set_registers(&self, regs: &libc::user_regs_struct) -> Result<(), DirtyLogError> {
        // SAFETY: the tracee is stopped; `regs` points at a full register set.
        if unsafe { libc::ptrace(libc::PTRACE_SETREGS, self.tid, 0, regs) } != 0 {
            return Err(unavailable(format!(
                "ptrace(SETREGS): {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Run one system call in the tracee, at `instruction` (an address holding
    /// `syscall`), and return its result (a negative errno on failure).
    fn system_call(
        &mut self,
        instruction: u64,
        number: i64,
        arg0: u64,
    ) -> Result<i64, DirtyLogError> {
        let mut regs = self.saved;
        regs.rip = instruction;
        regs.rax = number as u64;
        regs.rdi = arg0;
        // Not in a system call: the kernel must not restart anything on the way out.
        regs.orig_rax = u64::MAX;
        self.set_registers(&regs)?;
        loop {
            // SAFETY: single-stepping our stopped tracee, no signal injected.
            if unsafe { libc::ptrace(libc::PTRACE_SINGLESTEP, self.tid, 0, 0) } != 0 {
                return Err(unavailable(format!(
                    "ptrace(SINGLESTEP): {}",
                    std::io::Error::last_os_error()
                )));
            }
            let signal = wait_stop(self.tid)?;
            let now = registers(self.tid)?;
            if signal == libc::SIGTRAP && now.rip == instruction + 2 {
                self.set_registers(&self.saved)?;
                return Ok(now.rax as i64);
            }
            if signal != libc::SIGTRAP && self.pending_signal == 0 {
                // A signal stopped it before the step: deliver it when we let go.
                self.pending_signal = signal;
            }
            if now.rip != instruction {
                self.set_registers(&self.saved)?;
                return Err(unavailable(format!(
                    "the injected system call did not complete (stopped at {:#x})",
                    now.rip
                )));
            }
        }
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        // SAFETY: the tracee is stopped; putting back its registers and detaching lets
        // it continue where it was (restarting an interrupted system call).
        unsafe {
            libc::ptrace(libc::PTRACE_SETREGS, self.tid, 0, &self.saved);
            libc::ptrace(libc::PTRACE_DETACH, self.tid, 0, self.pending_signal);
        }
    }
}

/// An address in `pid` holding a `syscall` instruction: right before where the stopped
/// thread is (it stopped in a system call), or anywhere in its vDSO.
fn syscall_instruction(pid: u32, rip: u64) -> Result<u64, DirtyLogError> {
    let mem = File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| unavailable(format!("/proc/{pid}/mem: {e}")))?;
    let read = |at: u64, len: usize| -> Option<Vec<u8>> {
        let mut bytes = vec![0; len];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, at).ok()?;
        Some(bytes)
    };
    if rip >= 2 && read(rip - 2, 2).as_deref() == Some(&SYSCALL_INSTRUCTION[..]) {
        return Ok(rip - 2);
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| unavailable(format!("/proc/{pid}/maps: {e}")))?;
    let vdso = maps
        .lines()
        .find(|l| l.ends_with("[vdso]"))
        .and_then(|l| parse_address_range(l.split_whitespace().next()?));
    if let Some((start, end)) = vdso
        && let Some(code) = read(start, (end - start) as usize)
        && let Some(at) = code.windows(2).position(|w| w == SYSCALL_INSTRUCTION)
    {
        return Ok(start + at as u64);
    }
    Err(unavailable(format!(
        "no syscall instruction found in process {pid}"
    )))
}

/// A userfaultfd of `pid`'s address space, created by `pid` itself and copied here.
fn borrow_userfaultfd(pid: u32) -> Result<OwnedFd, DirtyLogError> {
    let mut thread = StoppedThread::stop(pid as libc::pid_t)?;
    let instruction = syscall_instruction(pid, thread.saved.rip)?;
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let mut remote = thread.system_call(instruction, libc::SYS_userfaultfd, flags)?;
    if remote == -i64::from(libc::EPERM) {
        // vm.unprivileged_userfaultfd = 0 and an unprivileged writer: user-mode faults
        // only, which asynchronous write-protect does not need anyway.
        remote = thread.system_call(
            instruction,
            libc::SYS_userfaultfd,
            flags | UFFD_USER_MODE_ONLY as u64,
        )?;
    }
    if remote < 0 {
        return Err(unavailable(format!(
            "userfaultfd() in process {pid}: {}",
            std::io::Error::from_raw_os_error(-remote as i32)
        )));
    }
    let copied = copy_descriptor(pid, remote as libc::c_int);
    // The writer's copy is closed whatever happened: it must not keep the context.
    thread.system_call(instruction, libc::SYS_close, remote as u64)?;
    drop(thread);
    copied
}

/// `pidfd_getfd`: a copy of descriptor `fd` of process `pid`.
fn copy_descriptor(pid: u32, fd: libc::c_int) -> Result<OwnedFd, DirtyLogError> {
    // SAFETY: plain syscalls with integer arguments; results are checked and the
    // descriptors they return are owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(unavailable(format!(
            "pidfd_open({pid}): {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `pidfd` was just opened and is ours.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as libc::c_int) };
    // SAFETY: as above.
    let copy = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        )
    };
    if copy < 0 {
        return Err(unavailable(format!(
            "pidfd_getfd of process {pid}'s userfaultfd: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: pidfd_getfd returned a new descriptor of ours (close-on-exec).
    Ok(unsafe { OwnedFd::from_raw_fd(copy as libc::c_int) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_name_the_file_and_how_it_is_mapped() {
        let shared = parse_maps_line(
            "7f64d463d000-7f64d863d000 rw-s 00000000 00:1a 3077   /dev/shm/vm (deleted)",
        )
        .unwrap();
        assert_eq!(
            (shared.start, shared.end, shared.offset),
            (0x7f64_d463_d000, 0x7f64_d863_d000, 0)
        );
        assert!(shared.shared_writable);
        assert_eq!(shared.file.inode, 3077);
        assert_eq!(shared.file.device, libc::makedev(0, 0x1a));
        let private = parse_maps_line("55d0-55e0 rw-p 00001000 08:01 42 /usr/bin/qemu").unwrap();
        assert!(!private.shared_writable);
        assert_eq!(private.offset, 0x1000);
        assert!(parse_maps_line("7ffd-7ffe rw-p 00000000 00:00 0 [stack]").is_none());
        assert!(parse_maps_line("garbage").is_none());
    }
}
