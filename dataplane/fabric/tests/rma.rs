//! RMA writes through libfabric's `tcp` provider on loopback: a real RMA path (the
//! provider implements `fi_write` with remote keys over sockets), from registered
//! memory here straight into registered memory of the peer.

use dwcp_fabric::{Connection, FabricError, Listener, RemoteRegion, RmaWrite};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const PROVIDER: &str = "tcp";
const PATIENCE: Duration = Duration::from_secs(20);

/// Skip (with the reason) where this build or machine has no tcp provider.
fn tcp_provider() -> bool {
    match dwcp_fabric::providers() {
        Ok(list)
            if list
                .iter()
                .any(|p| p.provider.split(';').any(|x| x == PROVIDER)) =>
        {
            true
        }
        Ok(list) => {
            eprintln!("skipping: no {PROVIDER} provider with RMA here ({list:?})");
            false
        }
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

/// A write of `len` bytes from `offset` to `remote_offset`, completing as `context`.
fn at(offset: usize, len: usize, remote_offset: usize, context: u64) -> RmaWrite {
    RmaWrite {
        offset: offset as u64,
        len: len as u64,
        remote_offset: remote_offset as u64,
        context,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// A connected pair on loopback: (the writer, the target).
fn pair() -> (Connection, Connection) {
    let listener = Listener::bind(PROVIDER, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    assert_ne!(addr.port(), 0, "the listener is bound to a port");
    let accepting = std::thread::spawn(move || listener.accept(PATIENCE));
    let writer = Connection::connect(PROVIDER, addr, PATIENCE).unwrap();
    let target = accepting.join().unwrap().unwrap();
    (writer, target)
}

/// Keep the target's provider progressing (the tcp provider progresses manually:
/// remote writes land while the target polls) until `done`.
fn progress_target(
    target: Connection,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Connection> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        // Acquire: pairs with the writer's Release once its writes completed.
        while !done.load(Ordering::Acquire) {
            // Blocks while nothing completes; the provider progresses meanwhile.
            target
                .wait_completions(&mut seen, Duration::from_millis(5))
                .unwrap();
        }
        target
    })
}

#[test]
fn pages_written_by_rma_land_in_the_peers_registered_memory() {
    if !tcp_provider() {
        return;
    }
    let started = Instant::now();
    const PAGES: usize = 2048;
    const PAGE: usize = 4096;
    let mut source = pattern(PAGES * PAGE, 7);
    let mut dest = vec![0u8; PAGES * PAGE];
    let (writer, target) = pair();
    // SAFETY: both buffers outlive their regions (dropped at the end of the test, after
    // the regions) and are not touched until the writes completed.
    let local = unsafe { writer.register(source.as_mut_ptr(), source.len()) }.unwrap();
    // SAFETY: as above.
    let remote_region = unsafe { target.register(dest.as_mut_ptr(), dest.len()) }.unwrap();
    let remote = remote_region.remote();
    let done = Arc::new(AtomicBool::new(false));
    let target = progress_target(target, done.clone());
    // Runs of pages, out of order, as a migration's batches would come.
    let runs: Vec<(usize, usize)> = (0..PAGES / 16).rev().map(|r| (r * 16, 16)).collect();
    let mut completed = Vec::new();
    for (i, &(first, count)) in runs.iter().enumerate() {
        writer
            .write(
                &local,
                &remote,
                at(first * PAGE, count * PAGE, first * PAGE, i as u64 + 1),
                &mut completed,
            )
            .unwrap();
    }
    let deadline = Instant::now() + PATIENCE;
    while completed.len() < runs.len() {
        writer.completions(&mut completed).unwrap();
        assert!(
            Instant::now() < deadline,
            "{} of {} writes completed",
            completed.len(),
            runs.len()
        );
    }
    completed.sort_unstable();
    assert_eq!(completed, (1..=runs.len() as u64).collect::<Vec<_>>());
    // Release: pairs with the target thread's Acquire.
    done.store(true, Ordering::Release);
    let target = target.join().unwrap();
    drop(remote_region);
    drop(local);
    let first_wrong = source
        .chunks(PAGE)
        .zip(dest.chunks(PAGE))
        .position(|(a, b)| a != b);
    assert_eq!(first_wrong, None, "the page that differs");
    eprintln!(
        "{} MiB in {} RMA writes through {} landed intact; {:?}",
        (PAGES * PAGE) >> 20,
        runs.len(),
        target.provider(),
        started.elapsed()
    );
}

#[test]
fn a_write_outside_the_peers_region_is_refused_before_it_leaves() {
    if !tcp_provider() {
        return;
    }
    let (writer, target) = pair();
    let mut source = vec![1u8; 8192];
    let mut dest = vec![0u8; 4096];
    // SAFETY: both buffers outlive their regions.
    let local = unsafe { writer.register(source.as_mut_ptr(), source.len()) }.unwrap();
    // SAFETY: as above.
    let region = unsafe { target.register(dest.as_mut_ptr(), dest.len()) }.unwrap();
    let remote = region.remote();
    let mut completed = Vec::new();
    let too_long = writer.write(&local, &remote, at(0, 8192, 0, 1), &mut completed);
    assert!(
        matches!(too_long, Err(FabricError::Protocol(_))),
        "{too_long:?}"
    );
    let past_end = writer.write(&local, &remote, at(0, 4096, 1, 2), &mut completed);
    assert!(
        matches!(past_end, Err(FabricError::Protocol(_))),
        "{past_end:?}"
    );
    // A key the peer never gave: the provider refuses the write at the target, and the
    // writer hears it as a failed completion.
    let forged = RemoteRegion {
        key: remote.key ^ 0x5a5a,
        ..remote
    };
    let done = Arc::new(AtomicBool::new(false));
    let target = progress_target(target, done.clone());
    writer
        .write(&local, &forged, at(0, 4096, 0, 3), &mut completed)
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let outcome = loop {
        match writer.completions(&mut completed) {
            Err(e) => break Err(e),
            Ok(_) if !completed.is_empty() => break Ok(completed.clone()),
            Ok(_) => {}
        }
        if Instant::now() > deadline {
            break Ok(Vec::new());
        }
    };
    // Release: pairs with the target thread's Acquire.
    done.store(true, Ordering::Release);
    let _target = target.join().unwrap();
    drop(region);
    eprintln!("a write with a forged key: {outcome:?}");
    assert!(
        outcome.is_err(),
        "the writer hears of the refusal: {outcome:?}"
    );
    assert!(
        dest.iter().all(|&b| b == 0),
        "nothing landed through a forged key"
    );
}

#[test]
fn a_request_shows_its_data_and_a_rejected_one_fails_to_connect() {
    if !tcp_provider() {
        return;
    }
    let listener = Listener::bind(PROVIDER, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let judged = std::thread::spawn(move || {
        let first = listener.request(PATIENCE).unwrap();
        assert_eq!(first.data(), b"not this one");
        first.reject();
        let second = listener.request(PATIENCE).unwrap();
        assert_eq!(second.data(), b"token");
        second.accept(PATIENCE).map(|_| ())
    });
    let refused = Connection::connect_with(PROVIDER, addr, b"not this one", PATIENCE);
    assert!(refused.is_err(), "a rejected request does not connect");
    let accepted = Connection::connect_with(PROVIDER, addr, b"token", PATIENCE);
    assert!(accepted.is_ok(), "{:?}", accepted.err());
    judged.join().unwrap().unwrap();
    let too_long = Connection::connect_with(PROVIDER, addr, &[0; 57], PATIENCE);
    assert!(matches!(too_long, Err(FabricError::Protocol(_))));
}
