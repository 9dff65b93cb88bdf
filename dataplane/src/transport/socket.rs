//! TCP socket setup and `TCP_INFO` sampling.

use std::fmt;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often a connection attempt looks at its cancel flag.
const CONNECT_POLL: Duration = Duration::from_millis(50);

/// Connects to `peer` within `timeout`, like [`TcpStream::connect_timeout`], except
/// that setting `cancel` ends the attempt within 50 ms (an `Interrupted` error): an
/// operator's cancel must not wait out a connect timeout across a path that drops SYNs.
pub fn connect_cancellable(
    peer: SocketAddr,
    timeout: Duration,
    cancel: &AtomicBool,
) -> std::io::Result<TcpStream> {
    let (family, address, length) = raw_address(peer);
    // SAFETY: a plain socket(2) call; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `address` holds a sockaddr of `length` bytes for `family`.
    let rc = unsafe { libc::connect(fd, (&raw const address).cast(), length) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let deadline = Instant::now() + timeout;
        loop {
            // Acquire: pairs with the Release store of whoever cancels.
            if cancel.load(Ordering::Acquire) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "cancelled while connecting",
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection timed out",
                ));
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            let wait = left.min(CONNECT_POLL).as_millis().max(1) as libc::c_int;
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, wait) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ready > 0 {
                break;
            }
        }
        let mut error: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reading an int option into an int.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut error).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if error != 0 {
            return Err(std::io::Error::from_raw_os_error(error));
        }
    }
    let stream = TcpStream::from(owned);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// `peer` as a sockaddr for connect(2): family, storage, length.
fn raw_address(peer: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match peer {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            (
                libc::AF_INET,
                storage,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            (
                libc::AF_INET6,
                storage,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

// asm-generic/socket.h (x86-64 uses the generic values).
const SO_SNDBUFFORCE: libc::c_int = 32;
const SO_RCVBUFFORCE: libc::c_int = 33;
const SO_MAX_PACING_RATE: libc::c_int = 47;

/// TCP congestion control algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Congestion {
    /// Loss-based, Linux's default.
    Cubic,
    /// Model-based (bandwidth and RTT), better on long lossy paths.
    Bbr,
}

impl Congestion {
    /// The kernel's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
        }
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            other => Err(format!(
                "unknown congestion control {other:?} (expected cubic or bbr)"
            )),
        }
    }
}

/// Options applied to every data stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    /// Send and receive buffer size in bytes (forced past `wmem_max` when root); 0
    /// leaves them to the kernel's autotuning (`tcp_wmem`/`tcp_rmem`).
    pub buffer_bytes: usize,
    /// Congestion control.
    pub congestion: Congestion,
    /// `SO_MAX_PACING_RATE` in bytes per second (an operator's bandwidth cap), if any.
    pub pacing_rate: Option<u64>,
    /// `TCP_NOTSENT_LOWAT`: bytes a stream may hold not yet sent. Bounds how much data
    /// waits in the kernel, so what the engine hands over is close to what is on the
    /// wire (its bandwidth estimates hold) and a codec change reaches the wire within
    /// this many bytes, not a whole socket buffer later. `None`: no bound.
    pub notsent_lowat: Option<u32>,
    /// `TCP_RTO_MAX_MS`: the longest a retransmission timer may back off to. While a
    /// path is out each wait doubles; capped, a connection retransmits within this
    /// long of the path coming back instead of up to twice the outage later. `None`:
    /// the kernel's (120 s).
    pub rto_max: Option<Duration>,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged before the
    /// connection is dropped (with `rto_max` capped, the kernel's retry count alone
    /// would drop it after some 15 s of outage). `None`: the kernel's.
    pub user_timeout: Option<Duration>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            buffer_bytes: 4 << 20,
            congestion: Congestion::Cubic,
            pacing_rate: None,
            notsent_lowat: Some(64 << 10),
            rto_max: Some(Duration::from_secs(1)),
            user_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// include/uapi/linux/tcp.h (Linux 6.15): the per-socket cap on the retransmission
/// timeout, milliseconds (1000..=120000).
const TCP_RTO_MAX_MS: libc::c_int = 44;

/// Make `stream` come back quickly after an outage and outlive one of up to
/// `user_timeout` (see [`SocketOptions::rto_max`], [`SocketOptions::user_timeout`]).
/// Returns what the kernel refused, for the report.
pub fn ride_out_outages(stream: &TcpStream, options: &SocketOptions) -> Vec<String> {
    let mut notes = Vec::new();
    let fd = stream.as_raw_fd();
    if let Some(max) = options.rto_max {
        let ms = max.as_millis().clamp(1000, 120_000) as libc::c_int;
        if let Err(e) = setsockopt(fd, libc::IPPROTO_TCP, TCP_RTO_MAX_MS, &ms) {
            notes.push(format!(
                "TCP_RTO_MAX_MS {ms}: {e} (a kernel before 6.15): after an outage the streams wait for TCP's backed-off retransmission timers"
            ));
        }
    }
    if let Some(timeout) = options.user_timeout {
        let ms = timeout.as_millis().min(u32::MAX as u128) as libc::c_uint;
        if let Err(e) = setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, &ms) {
            notes.push(format!("TCP_USER_TIMEOUT {ms} ms: {e}"));
        }
    }
    notes
}

fn setsockopt<T>(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: `value` points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Apply `options` to a connected stream; returns notes about anything that could not
/// be applied exactly (the stream still works).
pub fn configure(stream: &TcpStream, options: &SocketOptions) -> Vec<String> {
    let mut notes = Vec::new();
    let fd = stream.as_raw_fd();
    if let Err(e) = stream.set_nodelay(true) {
        notes.push(format!("TCP_NODELAY: {e}"));
    }
    let size = options.buffer_bytes.min(i32::MAX as usize) as libc::c_int;
    let sizes: &[(libc::c_int, libc::c_int, &str)] = if size == 0 {
        &[]
    } else {
        &[
            (SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
            (SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
        ]
    };
    for &(force, plain, name) in sizes {
        if setsockopt(fd, libc::SOL_SOCKET, force, &size).is_err()
            && let Err(e) = setsockopt(fd, libc::SOL_SOCKET, plain, &size)
        {
            notes.push(format!("{name} buffer of {size} bytes: {e}"));
        }
    }
    if let Err(e) = set_congestion(stream, options.congestion) {
        notes.push(e);
    }
    if let Some(rate) = options.pacing_rate
        && let Err(e) = set_pacing_rate(stream, Some(rate))
    {
        notes.push(e);
    }
    if let Some(bytes) = options.notsent_lowat
        && let Err(e) = setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, &bytes)
    {
        notes.push(format!("TCP_NOTSENT_LOWAT {bytes}: {e}"));
    }
    notes.extend(ride_out_outages(stream, options));
    notes
}

/// Switch a stream's congestion control (takes effect on the live connection).
pub fn set_congestion(stream: &TcpStream, congestion: Congestion) -> Result<(), String> {
    let name = congestion.name().as_bytes();
    // SAFETY: `name` is valid for `len` bytes; TCP_CONGESTION takes a string.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "congestion control {congestion}: {} (see /proc/sys/net/ipv4/tcp_available_congestion_control)",
            std::io::Error::last_os_error()
        ))
    }
}

/// Start a stream's congestion control afresh: another algorithm, then `congestion`
/// again (the kernel ignores setting the one in force). BBR then begins in start-up
/// from the stream's current window, with its bandwidth model forgotten.
pub fn restart_congestion(stream: &TcpStream, congestion: Congestion) -> Result<(), String> {
    let other = match congestion {
        Congestion::Bbr => Congestion::Cubic,
        Congestion::Cubic => Congestion::Bbr,
    };
    set_congestion(stream, other)?;
    set_congestion(stream, congestion)
}

/// Streams whose BBR has starved, and the rate they fell short of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StarvedStreams {
    /// The BBR streams' median pacing rate, bytes per second.
    pub median_pacing_rate: u64,
    /// Indexes into the samples given.
    pub streams: Vec<usize>,
}

/// The streams (indexes into `samples`) whose BBR has starved: paced below an eighth
/// of the BBR streams' median rate; `None` when no stream has.
///
/// BBR (v1) keeps the most it delivered over the last ten round trips as the path's
/// rate. A stream that lost many packets while its windows were cut, and then had
/// little to send, can keep a model of a few Mbit/s beside streams pacing at a hundred,
/// and relearns only by a quarter every eight round trips (seen on the cross-region
/// path after round 0's losses: three of 16 streams at 2.4-7.3 Mbit/s, cwnd 52-152,
/// took 1.3 s to carry their share of a 14 MB final round the others sent in 0.1 s).
/// Fewer than three BBR streams give no median worth the name: none.
pub fn starved_bbr_streams(samples: &[TcpInfoSample]) -> Option<StarvedStreams> {
    let paced_bbr = |t: &TcpInfoSample| t.congestion == Some(Congestion::Bbr) && t.pacing_rate > 0;
    let mut rates: Vec<u64> = samples
        .iter()
        .filter(|t| paced_bbr(t))
        .map(|t| t.pacing_rate)
        .collect();
    if rates.len() < 3 {
        return None;
    }
    rates.sort_unstable();
    let median = rates[rates.len() / 2];
    let streams: Vec<usize> = samples
        .iter()
        .enumerate()
        .filter(|(_, t)| paced_bbr(t) && t.pacing_rate.saturating_mul(8) < median)
        .map(|(i, _)| i)
        .collect();
    (!streams.is_empty()).then_some(StarvedStreams {
        median_pacing_rate: median,
        streams,
    })
}

/// Cap a stream's send rate (`None` removes the cap).
pub fn set_pacing_rate(stream: &TcpStream, bytes_per_second: Option<u64>) -> Result<(), String> {
    let rate: u64 = bytes_per_second.unwrap_or(u64::MAX);
    setsockopt(
        stream.as_raw_fd(),
        libc::SOL_SOCKET,
        SO_MAX_PACING_RATE,
        &rate,
    )
    .map_err(|e| format!("SO_MAX_PACING_RATE {rate}: {e}"))
}

/// Prefix of the kernel's `struct tcp_info` (include/uapi/linux/tcp.h) up to
/// `tcpi_reord_seen` (Linux 4.19+; an older kernel fills less and the rest reads 0);
/// later fields are not needed.
#[repr(C)]
#[derive(Default)]
struct TcpInfoRaw {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
    delivery_rate: u64,
    busy_time: u64,
    rwnd_limited: u64,
    sndbuf_limited: u64,
    delivered: u32,
    delivered_ce: u32,
    bytes_sent: u64,
    bytes_retrans: u64,
    dsack_dups: u32,
    reord_seen: u32,
}

/// One `TCP_INFO` reading of a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TcpInfoSample {
    /// Smoothed RTT, microseconds.
    pub rtt_us: u32,
    /// RTT variance, microseconds.
    pub rttvar_us: u32,
    /// Minimum RTT seen, microseconds.
    pub min_rtt_us: u32,
    /// Segments retransmitted over the connection's life.
    pub total_retrans: u32,
    /// Retransmissions the peer reported as duplicates (D-SACK, RFC 2883): spurious
    /// ones, such as a tail-loss probe sent while the receiver was merely slow. What
    /// was lost is `total_retrans - dsack_dups`.
    pub dsack_dups: u32,
    /// Segments sent over the connection's life.
    pub segs_out: u32,
    /// Most recent delivery rate estimate, bytes per second.
    pub delivery_rate: u64,
    /// Bytes acknowledged by the peer.
    pub bytes_acked: u64,
    /// Congestion window, segments.
    pub snd_cwnd: u32,
    /// The rate the congestion control paces at now, bytes per second.
    pub pacing_rate: u64,
    /// The send rate cap (`SO_MAX_PACING_RATE`), bytes per second; `u64::MAX` for none.
    pub max_pacing_rate: u64,
    /// The congestion control in force, when it is one of ours.
    pub congestion: Option<Congestion>,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Bytes written to the socket and not yet sent.
    pub notsent_bytes: u32,
    /// Time the connection had data outstanding, microseconds over its life
    /// (`tcpi_busy_time`: sending, or held back by either window or the send buffer).
    pub busy_us: u64,
    /// Of that, the time the receiver's window held sending back, microseconds
    /// (`tcpi_rwnd_limited`): the peer did not take the bytes as fast as they came.
    pub rwnd_limited_us: u64,
}

impl TcpInfoSample {
    /// Whether the stream has bytes the peer has not acknowledged (sent or not).
    pub fn outstanding(&self) -> bool {
        self.unacked > 0 || self.notsent_bytes > 0
    }
}

/// Read `TCP_INFO` from a stream.
pub fn tcp_info(stream: &impl AsRawFd) -> Option<TcpInfoSample> {
    let mut raw = TcpInfoRaw::default();
    let mut len = std::mem::size_of::<TcpInfoRaw>() as libc::socklen_t;
    // SAFETY: `raw` is writable for `len` bytes; the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut raw as *mut TcpInfoRaw).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    Some(TcpInfoSample {
        rtt_us: raw.rtt,
        rttvar_us: raw.rttvar,
        min_rtt_us: raw.min_rtt,
        total_retrans: raw.total_retrans,
        dsack_dups: raw.dsack_dups,
        segs_out: raw.segs_out,
        delivery_rate: raw.delivery_rate,
        bytes_acked: raw.bytes_acked,
        snd_cwnd: raw.snd_cwnd,
        pacing_rate: raw.pacing_rate,
        max_pacing_rate: raw.max_pacing_rate,
        congestion: congestion(stream),
        unacked: raw.unacked,
        notsent_bytes: raw.notsent_bytes,
        busy_us: raw.busy_time,
        rwnd_limited_us: raw.rwnd_limited,
    })
}

/// The congestion control a stream uses now, when it is cubic or bbr.
pub fn congestion(stream: &impl AsRawFd) -> Option<Congestion> {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: `name` is writable for `len` bytes; the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let name = &name[..(len as usize).min(name.len())];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    match &name[..end] {
        b"cubic" => Some(Congestion::Cubic),
        b"bbr" => Some(Congestion::Bbr),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_connect_ends_at_once_and_a_good_one_connects() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let never = AtomicBool::new(false);
        let s = connect_cancellable(
            listener.local_addr().unwrap(),
            Duration::from_secs(5),
            &never,
        )
        .expect("connects");
        assert!(s.peer_addr().is_ok());
        // Nothing listens on a port just freed: refused at once, not timed out.
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = connect_cancellable(free, Duration::from_secs(5), &never).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        // A listener whose accept queue is full drops further SYNs: a connect to it
        // hangs, and only the cancel ends it.
        let full = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen(2) on our own socket, shrinking its backlog to the least.
        assert_eq!(unsafe { libc::listen(full.as_raw_fd(), 0) }, 0);
        let address = full.local_addr().unwrap();
        let mut queued = Vec::new();
        let cancel = std::sync::Arc::new(AtomicBool::new(false));
        let hung = loop {
            let flag = cancel.clone();
            let canceller = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                flag.store(true, Ordering::Release);
            });
            let started = Instant::now();
            let attempt = connect_cancellable(address, Duration::from_secs(30), &cancel);
            canceller.join().unwrap();
            cancel.store(false, Ordering::Release);
            match attempt {
                Ok(s) => queued.push(s),
                Err(e) => break (e, started.elapsed()),
            }
            assert!(queued.len() < 16, "the accept queue never filled");
        };
        // Interrupted, not TimedOut: the cancel ended it, not the 30 s timeout.
        assert_eq!(hung.0.kind(), std::io::ErrorKind::Interrupted, "{}", hung.0);
        eprintln!("a hung connect ended {:?} after it began", hung.1);
    }
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn options_apply_and_tcp_info_reads_a_live_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let notes = configure(
            &client,
            &SocketOptions {
                congestion: Congestion::Bbr,
                pacing_rate: Some(1 << 30),
                ..SocketOptions::default()
            },
        );
        // bbr may be missing on some kernels; everything else must apply.
        assert!(notes.iter().all(|n| n.contains("bbr")), "{notes:?}");
        (&client).write_all(&[7u8; 100_000]).unwrap();
        let mut buf = vec![0u8; 100_000];
        server.read_exact(&mut buf).unwrap();
        let info = tcp_info(&client).unwrap();
        assert!(info.segs_out > 0);
        assert!(info.bytes_acked > 0 || info.rtt_us > 0);
        assert!("bbr".parse::<Congestion>().is_ok() && "reno".parse::<Congestion>().is_err());
    }

    fn paced(congestion: Congestion, bytes_per_second: u64) -> TcpInfoSample {
        TcpInfoSample {
            congestion: Some(congestion),
            pacing_rate: bytes_per_second,
            ..TcpInfoSample::default()
        }
    }

    #[test]
    fn a_bbr_stream_paced_far_below_the_others_is_starved() {
        use Congestion::{Bbr, Cubic};
        // The cross-region streams at the final round: most near 10 MB/s, three
        // pacing at 0.3-0.9 MB/s.
        let mut streams: Vec<TcpInfoSample> = (0..13).map(|i| paced(Bbr, 9_000_000 + i)).collect();
        streams.insert(2, paced(Bbr, 303_000));
        streams.insert(7, paced(Bbr, 385_000));
        streams.insert(11, paced(Bbr, 918_000));
        let starved = starved_bbr_streams(&streams).expect("three starved");
        assert_eq!(starved.streams, vec![2, 7, 11]);
        assert_eq!(starved.median_pacing_rate, 9_000_005);
        // Start-up's gain against probing's (2.89 against 1) is no starvation.
        let mut even: Vec<TcpInfoSample> = (0..8).map(|_| paced(Bbr, 3_000_000)).collect();
        even.push(paced(Bbr, 1_040_000));
        assert_eq!(starved_bbr_streams(&even), None);
        // CUBIC streams, streams with no rate, and too few streams say nothing.
        let cubic: Vec<TcpInfoSample> = (0..8).map(|i| paced(Cubic, 1 + i * 10_000_000)).collect();
        assert_eq!(starved_bbr_streams(&cubic), None);
        let two = [paced(Bbr, 10_000_000), paced(Bbr, 1)];
        assert_eq!(starved_bbr_streams(&two), None);
        let unpaced = [
            paced(Bbr, 0),
            paced(Bbr, 9e6 as u64),
            paced(Bbr, 9e6 as u64),
            paced(Bbr, 9e6 as u64),
        ];
        assert_eq!(starved_bbr_streams(&unpaced), None);
    }

    /// Restarting a stream's BBR keeps BBR in force (and a stream whose congestion
    /// control cannot change says why).
    #[test]
    fn restarting_congestion_control_keeps_the_algorithm() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _server = listener.accept().unwrap();
        if set_congestion(&client, Congestion::Bbr).is_err() {
            eprintln!("SKIP: bbr is not available on this kernel");
            return;
        }
        restart_congestion(&client, Congestion::Bbr).unwrap();
        assert_eq!(congestion(&client), Some(Congestion::Bbr));
        restart_congestion(&client, Congestion::Cubic).unwrap();
        assert_eq!(congestion(&client), Some(Congestion::Cubic));
    }
}
