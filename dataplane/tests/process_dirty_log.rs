//! The dirty log of a file another process writes through its own mapping (QEMU's
//! case), tracked in that process's page tables with a userfaultfd borrowed from it.
//!
//! The writer is this test binary run again as a child: told by an environment
//! variable to map the file and write the pages it is told on stdin.

use dwcp_dataplane::dirty::{DirtyBitmap, DirtyLog, open_process_dirty_log, probe_uffd_wp_async};
use dwcp_dataplane::memory::PAGE_SIZE;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// Set in a child: the file it maps and writes.
const WRITER_FILE: &str = "DWCP_TEST_WRITER_FILE";
/// Lines the writer prints start with this (the harness prints its own lines too).
const SAYS: &str = "writer:";
const PAGES: u64 = 1024;

fn skip(reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {reason}");
}

/// The child's life: map the file, then for each line `w PAGE...` write one byte in
/// each page and answer `done`; `q` ends it.
fn be_the_writer(path: &str) -> ! {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a shared mapping of a file this process keeps open; only bytes are stored.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    } as *mut u8;
    assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
    say("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("w") => {
                for page in words.map(|w| w.parse::<usize>().unwrap()) {
                    // SAFETY: `page` is within the mapping (the test asks for valid pages).
                    unsafe {
                        let at = base.add(page * PAGE_SIZE + 8);
                        at.write_volatile(at.read_volatile().wrapping_add(1));
                    }
                }
                say("done");
            }
            _ => std::process::exit(0),
        }
    }
    std::process::exit(0)
}

/// A line to the parent, on stdout itself (`println!` may be captured by the harness).
fn say(word: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{SAYS} {word}").unwrap();
    out.flush().unwrap();
}

struct Writer {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Writer {
    fn start(test: &str, file: &Path) -> Writer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(WRITER_FILE, file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        let mut writer = Writer {
            child,
            input,
            output,
        };
        writer.expect("ready");
        writer
    }

    fn expect(&mut self, word: &str) {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.output.read_line(&mut line).unwrap() > 0,
                "the writer ended"
            );
            // The harness may have begun the line ("test NAME ... ").
            if let Some((_, said)) = line.split_once(SAYS) {
                assert_eq!(said.trim(), word);
                return;
            }
        }
    }

    fn write(&mut self, pages: &[u64]) {
        let list: Vec<String> = pages.iter().map(u64::to_string).collect();
        writeln!(self.input, "w {}", list.join(" ")).unwrap();
        self.expect("done");
    }

    /// Tell it to end and check that it ended by itself (a stray signal from the
    /// tracing would have killed it).
    fn finish(mut self) {
        writeln!(self.input, "q").unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the writer ended with {status}");
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A memory file of `PAGES` pages, removed when dropped.
struct MemoryFile(PathBuf);

impl MemoryFile {
    fn new(tag: &str) -> MemoryFile {
        let path =
            std::env::temp_dir().join(format!("dwcp-process-log-{tag}-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(PAGES * PAGE_SIZE as u64).unwrap();
        MemoryFile(path)
    }
}

impl Drop for MemoryFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Why the test cannot run here, if it cannot.
fn unable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("tracing another process's page tables needs root (CAP_SYS_PTRACE)".into());
    }
    probe_uffd_wp_async().err()
}

/// Each test's start: in the child, become the writer; here, whether the test can run
/// (said on stderr when it cannot).
fn ready_to_test() -> bool {
    if let Ok(path) = std::env::var(WRITER_FILE) {
        be_the_writer(&path);
    }
    match unable() {
        Some(why) => {
            skip(&why);
            false
        }
        None => true,
    }
}

fn collected(log: &mut dyn DirtyLog) -> Vec<u64> {
    let mut pages = DirtyBitmap::new(PAGES);
    log.collect(&mut pages).unwrap();
    pages.iter().collect()
}

#[test]
fn another_process_s_writes_are_reported_page_by_page() {
    if !ready_to_test() {
        return;
    }
    let file = MemoryFile::new("pages");
    let mut writer = Writer::start(
        "another_process_s_writes_are_reported_page_by_page",
        &file.0,
    );
    let mut log = open_process_dirty_log(writer.child.id(), &file.0, PAGES * PAGE_SIZE as u64)
        .expect("tracking the writer");
    assert_eq!(
        collected(&mut log),
        Vec::<u64>::new(),
        "nothing written yet"
    );
    writer.write(&[3, 100, 777, PAGES - 1]);
    assert_eq!(collected(&mut log), [3, 100, 777, PAGES - 1]);
    writer.write(&[5]);
    writer.write(&[5, 6]);
    assert_eq!(collected(&mut log), [5, 6], "each interval starts afresh");
    assert_eq!(collected(&mut log), Vec::<u64>::new());
    drop(log);
    // Untracked, the writer goes on writing (no protection left behind) and ends
    // normally (the system call it was stopped in was restarted, no signal lost).
    writer.write(&[7, 8]);
    writer.finish();
}

#[test]
fn a_second_writer_of_the_file_is_refused_by_name() {
    if !ready_to_test() {
        return;
    }
    let file = MemoryFile::new("two");
    let name = "a_second_writer_of_the_file_is_refused_by_name";
    let first = Writer::start(name, &file.0);
    let second = Writer::start(name, &file.0);
    let refused = open_process_dirty_log(first.child.id(), &file.0, PAGES * PAGE_SIZE as u64)
        .err()
        .expect("two writers cannot be tracked through one")
        .to_string();
    assert!(
        refused.contains(&format!("process {}", second.child.id())) && refused.contains("unseen"),
        "{refused}"
    );
    let not_mapped = open_process_dirty_log(std::process::id(), &file.0, PAGES * PAGE_SIZE as u64)
        .err()
        .expect("this process does not map the file")
        .to_string();
    assert!(not_mapped.contains("does not map"), "{not_mapped}");
    first.finish();
    second.finish();
}
