//! Three `dwcpd serve` processes on loopback form a cluster, their raft messages over
//! mutually authenticated TLS: a flag and the mode override set on a follower apply on
//! all; the leader is
//! killed and another takes over within ten election timeouts (counted in the
//! survivors' ticks, not wall time) with the flags kept; a migration runs paced at the
//! site's budget and its record reaches the others; the killed member restarts and
//! catches up; a member killed with a migration running has it recorded `interrupted`
//! by the others, and restarted resumes it under its number to the end; a fourth appliance joins through the leader (a follower refuses and
//! names it), learns the cluster's state, and leaves; a connection that does not speak
//! TLS is refused and the cluster carries on; a member left alone takes no writes and
//! says why.
//!
//! Three appliances with no members configured found a cluster at run time: `cluster
//! init` on one, `cluster join ADDR` on the others (through a follower too), and one
//! restarted from its log alone.

mod common;

use dwcp_api::{
    ClusterInfo, ClusterMigrationInfo, Command, Done, FlagsInfo, MigrateOptions, MigrationInfo,
    Response,
};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

struct Member {
    id: u64,
    dir: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    fn start(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_dwcpd"));
        command
            .args(["serve", "--config"])
            .arg(self.dir.join("dwcp.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("log")).unwrap());
        self.child = Some(command.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "member {} did not start: {}",
                self.id,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Its guest's memory file (the simulated guest a migration from it moves).
    fn guest_file(&self) -> PathBuf {
        guest_file(&self.dir, self.id)
    }

    fn call(&self, command: Command) -> Response {
        common::call(&self.socket(), command)
    }

    fn status(&self) -> ClusterInfo {
        self.call(Command::ClusterStatus).into_result().unwrap()
    }

    fn flags(&self) -> FlagsInfo {
        self.call(Command::Flags).into_result().unwrap()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.guest_file());
    }
}

/// Member `id`'s guest memory file: in memory (`/dev/shm`), named after the test's
/// directory, which is unique to the process.
fn guest_file(dir: &Path, id: u64) -> PathBuf {
    let base = dir
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    PathBuf::from("/dev/shm").join(format!("{base}-guest-{id}.mem"))
}

/// The port of `listen` in section `[section]` of member `m`'s configuration.
fn listen_port(m: &Member, section: &str) -> u16 {
    let text = std::fs::read_to_string(m.dir.join("dwcp.toml")).unwrap();
    let header = format!("[{section}]");
    let line = text
        .lines()
        .skip_while(|l| *l != header)
        .find(|l| l.starts_with("listen"))
        .unwrap()
        .to_string();
    line.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('"')
        .parse()
        .unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes member `id`'s configuration (raft at `raft`, the member list `members` as
/// TOML lines) and starts it.
fn start_member(base: &Path, id: u64, raft: u16, members: &str, join: bool) -> Member {
    start_member_in(&base.join(format!("member-{id}")), id, raft, members, join)
}

/// [`start_member`] in directory `dir`.
fn start_member_in(dir: &Path, id: u64, raft: u16, members: &str, join: bool) -> Member {
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "[control]\nsocket = {socket:?}\nflags_file = {flags:?}\nstate_dir = {state:?}\n\
         [dest]\nlisten = \"127.0.0.1:{dest}\"\n{security}\
         [guest]\nmemory_file = {guest:?}\noverwrite_memory_file = true\n\
         [migration]\nauto_resume = true\n\
         [cluster]\nid = {id}\nlisten = \"127.0.0.1:{raft}\"\njoin = {join}\n[cluster.members]\n{members}",
        socket = dir.join("ctl.sock").display().to_string(),
        flags = dir.join("flags.toml").display().to_string(),
        state = dir.join("state").display().to_string(),
        guest = guest_file(&dir, id).display().to_string(),
        dest = free_port(),
        // Two lab certificates for all members: both valid for loopback and signed by
        // the site's CA, which is what a member must show.
        security = common::security_section(id as usize % 2),
    );
    std::fs::write(dir.join("dwcp.toml"), config).unwrap();
    let mut member = Member {
        id,
        dir,
        child: None,
    };
    member.start();
    member
}

fn cluster(base: &Path) -> Vec<Member> {
    let raft_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let members: String = raft_ports
        .iter()
        .enumerate()
        .map(|(i, port)| format!("{} = \"127.0.0.1:{port}\"\n", i + 1))
        .collect();
    (0..3)
        .map(|i| start_member(base, i as u64 + 1, raft_ports[i], &members, false))
        .collect()
}

/// Polls the running members until one is leader and the others follow it; returns
/// its index.
fn wait_for_leader(members: &[Member], patience: Duration) -> usize {
    let deadline = Instant::now() + patience;
    loop {
        let views: Vec<(usize, ClusterInfo)> = members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.child.is_some())
            .map(|(i, m)| (i, m.status()))
            .collect();
        if let Some((leader, info)) = views.iter().find(|(_, v)| v.role == "leader")
            && views.iter().all(|(_, v)| v.leader == info.id)
        {
            return *leader;
        }
        assert!(Instant::now() < deadline, "no leader: {views:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_until(what: &str, patience: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_appliances_keep_flags_budget_and_records_through_kills_a_join_and_a_lost_majority() {
    let start = Instant::now();
    let base = std::env::temp_dir().join(format!("dwcp-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let mut members = cluster(&base);
    let leader = wait_for_leader(&members, Duration::from_secs(20));
    let follower = (leader + 1) % 3;

    // A flag set on a follower is answered once applied there, and applies on all.
    let flags: FlagsInfo = members[follower]
        .call(Command::FlagSet {
            name: "safe-mode".into(),
            value: "on".into(),
        })
        .into_result()
        .unwrap();
    assert!(flags.safe_mode);
    wait_until("safe mode on every member", Duration::from_secs(5), || {
        members.iter().all(|m| m.flags().safe_mode)
    });
    // Written to each member's flags file too.
    for m in &members {
        let file = std::fs::read_to_string(m.dir.join("flags.toml")).unwrap();
        assert!(file.contains("safe_mode = true"), "member {}: {file}", m.id);
    }
    // The mode override likewise; a mode that does not exist is refused first.
    let refused = members[follower].call(Command::SetMode {
        mode: "warp".into(),
    });
    assert!(
        refused.error.unwrap_or_default().contains("unknown mode"),
        "a bad mode"
    );
    let answer = members[follower].call(Command::SetMode {
        mode: "internet".into(),
    });
    assert!(answer.ok, "{answer:?}");
    let setting = |m: &Member| -> String {
        let status: dwcp_api::StatusInfo = m.call(Command::Status).into_result().unwrap();
        status.mode.setting
    };
    wait_until("the mode on every member", Duration::from_secs(5), || {
        members.iter().all(|m| setting(m) == "internet")
    });

    // The leader dies. A new one within ten election timeouts of the survivors' ticks.
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let ticks_at_kill: Vec<u64> = survivors
        .iter()
        .map(|&i| members[i].status().ticks)
        .collect();
    let old_id = members[leader].id;
    members[leader].kill();
    let new_leader = wait_for_leader(&members, Duration::from_secs(30));
    let status = members[new_leader].status();
    assert_ne!(status.id, old_id);
    let waited = survivors
        .iter()
        .zip(&ticks_at_kill)
        .map(|(&i, &at)| members[i].status().ticks - at)
        .max()
        .unwrap();
    assert!(
        waited <= 10 * status.election_ticks,
        "a new leader after {waited} ticks (election timeout {} ticks)",
        status.election_ticks
    );
    eprintln!(
        "leader {old_id} killed: member {} leads term {} after at most {waited} ticks of the survivors ({} per election timeout)",
        status.id, status.term, status.election_ticks
    );
    for &i in &survivors {
        assert!(
            members[i].flags().safe_mode,
            "member {} lost the flag",
            members[i].id
        );
        assert_eq!(setting(&members[i]), "internet");
    }
    // Two of three still take writes.
    let answer = members[survivors[0]].call(Command::ClusterBudget {
        bits_per_second: Some(800_000_000),
    });
    assert!(answer.ok, "{answer:?}");

    // A migration under the budget: alone, it is paced at the whole budget (100 MB/s),
    // and its record reaches the other member.
    let (from, to) = (&members[survivors[0]], &members[survivors[1]]);
    let done: Done = from
        .call(Command::Migrate(MigrateOptions {
            peer: format!("127.0.0.1:{}", listen_port(to, "dest")),
            memory: Some("96M".into()),
            dirty_rate_mbps: Some(1.0),
            ..MigrateOptions::default()
        }))
        .into_result()
        .unwrap();
    let id = done.id.unwrap();
    let migration = |m: &Member| -> MigrationInfo {
        let all: Vec<MigrationInfo> = m.call(Command::Migrations).into_result().unwrap();
        all.into_iter()
            .find(|x| x.id == id && x.direction == "outgoing")
            .unwrap()
    };
    let pacing = migration(from)
        .settings
        .into_iter()
        .find(|s| s.name == "pacing-rate")
        .unwrap();
    assert_eq!(pacing.source, "cluster budget", "{pacing:?}");
    assert_eq!(
        pacing.value, "100000000/s",
        "800 Mbit/s in bytes: {pacing:?}"
    );
    wait_until("the migration ends", Duration::from_secs(60), || {
        migration(from).state != "running"
    });
    assert_eq!(migration(from).state, "completed");
    wait_until(
        "its record reaches the other member",
        Duration::from_secs(5),
        || to.status().migration_records == 1,
    );
    // `migrations` on the destination's appliance: its incoming side, and the source
    // appliance's migration as the cluster records it (read through the leader).
    let listed: Vec<MigrationInfo> = to.call(Command::Migrations).into_result().unwrap();
    assert!(
        listed
            .iter()
            .any(|m| m.direction == "incoming" && m.appliance.is_none()),
        "{listed:#?}"
    );
    let theirs = listed
        .iter()
        .find(|m| m.appliance == Some(from.id))
        .unwrap_or_else(|| panic!("no record of member {}'s migration: {listed:#?}", from.id));
    assert_eq!((theirs.id, theirs.state.as_str()), (id, "completed"));

    // The killed member restarts from its log and catches up.
    members[leader].start();
    wait_until(
        "the restarted member catches up",
        Duration::from_secs(20),
        || {
            let s = members[leader].status();
            s.budget_bits_per_second == Some(800_000_000) && s.role == "follower"
        },
    );
    assert!(members[leader].flags().safe_mode);
    assert_eq!(setting(&members[leader]), "internet");
    // The cluster in the metrics.
    let metrics: dwcp_api::MetricsText = members[leader]
        .call(Command::Metrics)
        .into_result()
        .unwrap();
    for family in [
        "dwcp_cluster_leader 0",
        "dwcp_cluster_has_leader 1",
        "dwcp_cluster_members 3",
        "dwcp_cluster_budget_bits_per_second 800000000",
        "dwcp_cluster_index{index=\"commit\"}",
        "dwcp_cluster_log_syncs_total",
    ] {
        assert!(
            metrics.text.contains(family),
            "{family} not in {}",
            metrics.text
        );
    }

    // A member dies with a migration running: the others record it interrupted.
    let (x, to) = (survivors[1], survivors[0]);
    let answer = members[x].call(Command::ClusterBudget {
        bits_per_second: Some(40_000_000),
    });
    assert!(answer.ok, "{answer:?}");
    let done: Done = members[x]
        .call(Command::Migrate(MigrateOptions {
            peer: format!("127.0.0.1:{}", listen_port(&members[to], "dest")),
            memory: Some("128M".into()),
            dirty_rate_mbps: Some(1.0),
            deadline_s: Some(600),
            ..MigrateOptions::default()
        }))
        .into_result()
        .unwrap();
    let x_id = members[x].id;
    let record = |m: &Member| -> Option<ClusterMigrationInfo> {
        let all: Vec<ClusterMigrationInfo> =
            m.call(Command::ClusterMigrations).into_result().ok()?;
        all.into_iter()
            .find(|r| r.source == x_id && Some(r.id) == done.id)
    };
    wait_until(
        "the running migration is recorded",
        Duration::from_secs(10),
        || {
            record(&members[to])
                .is_some_and(|r| r.state == "running" && r.round == 0 && r.deadline.is_some())
        },
    );
    // Killed once it sends (its session recorded in its state directory), not while
    // its guest is still being made.
    let session = members[x].dir.join("state").join("outgoing.session");
    wait_until("the migration sends", Duration::from_secs(20), || {
        session.exists()
            && members[x]
                .call(Command::Migrations)
                .into_result::<Vec<MigrationInfo>>()
                .is_ok_and(|all| all.iter().any(|m| m.bytes_sent > 4 << 20))
    });
    members[x].kill();
    let killed = Instant::now();
    wait_until(
        "the others record it interrupted",
        Duration::from_secs(15),
        || {
            record(&members[to])
                .is_some_and(|r| r.state == "interrupted" && r.interrupted_at.is_some())
        },
    );
    eprintln!(
        "member {x_id} killed with a migration running: recorded interrupted after {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    // Restarted, it finds the migration in its state directory and resumes it under
    // the same number (`auto_resume`); the others see it running again, then completed.
    members[x].start();
    wait_until("the member is back", Duration::from_secs(20), || {
        members[x].status().leader != 0
    });
    let answer = members[to].call(Command::ClusterBudget {
        bits_per_second: Some(800_000_000),
    });
    assert!(answer.ok, "{answer:?}");
    let restarted = Instant::now();
    loop {
        let seen = record(&members[to]);
        // The deadline went with it (the cluster's record kept it across the restart).
        if seen
            .as_ref()
            .is_some_and(|r| r.state == "completed" && r.deadline.is_some())
        {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(60),
            "the resumed migration does not complete: {seen:?}; the member's log: {}",
            members[x].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let local: Vec<MigrationInfo> = members[x].call(Command::Migrations).into_result().unwrap();
    let resumed = local
        .iter()
        .find(|m| Some(m.id) == done.id)
        .unwrap_or_else(|| panic!("the restarted member lists {local:?}: {}", members[x].log()));
    assert_eq!(resumed.state, "completed", "{resumed:?}");
    // Found in its state directory under its number, and resumed (not started over:
    // the session's record is the engine's, and a new migration would have taken 3).
    let found = format!("migration {} to ", resumed.id);
    assert!(
        members[x]
            .log()
            .lines()
            .any(|l| l.contains(&found) && l.contains("was interrupted in round 0")),
        "the restarted member did not find its migration: {}",
        members[x].log()
    );
    assert!(resumed.verified_pages.is_some(), "{resumed:?}");
    eprintln!(
        "member {x_id} restarted: migration {} resumed and completed {:.1} s later",
        resumed.id,
        restarted.elapsed().as_secs_f64()
    );

    // A connection that presents no certificate is refused; the cluster carries on.
    let raft_port = listen_port(&members[leader], "cluster");
    let refused_before = members[leader].status().connections_refused;
    let mut intruder = std::net::TcpStream::connect(("127.0.0.1", raft_port)).unwrap();
    let _ = intruder.write_all(&[
        0x10, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
    ]);
    drop(intruder);
    wait_until("the intruder is refused", Duration::from_secs(5), || {
        members[leader].status().connections_refused > refused_before
    });
    let answer = members[leader].call(Command::FlagSet {
        name: "rollout".into(),
        value: "40".into(),
    });
    assert!(answer.ok, "{answer:?}");
    wait_until("rollout on every member", Duration::from_secs(5), || {
        members.iter().all(|m| m.flags().rollout_percent == 40)
    });

    // A fourth appliance joins through the leader, learns what the cluster holds, and
    // leaves again. Only the leader changes membership; a follower names it.
    let leader_now = wait_for_leader(&members, Duration::from_secs(10));
    let port4 = free_port();
    let mut list: String = members
        .iter()
        .map(|m| format!("{} = \"127.0.0.1:{}\"\n", m.id, listen_port(m, "cluster")))
        .collect();
    list += &format!("4 = \"127.0.0.1:{port4}\"\n");
    let mut fourth = start_member(&base, 4, port4, &list, true);
    let follower_now = (leader_now + 1) % 3;
    let refused = members[follower_now].call(Command::ClusterJoin {
        id: 4,
        address: format!("127.0.0.1:{port4}"),
    });
    let error = refused.error.unwrap_or_default();
    assert!(error.contains("not the leader"), "{error}");
    let answer = members[leader_now].call(Command::ClusterJoin {
        id: 4,
        address: format!("127.0.0.1:{port4}"),
    });
    assert!(answer.ok, "{answer:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = fourth.status();
        if s.leader == members[leader_now].id
            && s.members.len() == 4
            && fourth.flags().rollout_percent == 40
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fourth member does not catch up: {s:#?}\nthe leader: {:#?}",
            members[leader_now].status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(members[leader_now].status().members.len(), 4);
    let answer = members[leader_now].call(Command::ClusterLeave { id: Some(4) });
    assert!(answer.ok, "{answer:?}");
    wait_until("three members again", Duration::from_secs(5), || {
        members.iter().all(|m| m.status().members.len() == 3)
    });
    fourth.kill();

    // Alone, a member takes no writes, and says why.
    let alone = survivors[0];
    for &i in &[leader, survivors[1]] {
        members[i].kill();
    }
    wait_until(
        "the lone member knows no leader",
        Duration::from_secs(10),
        || members[alone].status().leader == 0,
    );
    let refused = members[alone].call(Command::FlagSet {
        name: "delta".into(),
        value: "off".into(),
    });
    let error = refused.error.unwrap_or_default();
    assert!(error.contains("cannot reach a majority"), "{error}");
    assert!(members[alone].flags().flags["delta"].enabled);

    drop(members);
    let _ = std::fs::remove_dir_all(&base);
    eprintln!(
        "three-member cluster test: {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn appliances_with_no_members_configured_found_a_cluster_with_init_and_join() {
    let start = Instant::now();
    let base = std::env::temp_dir().join(format!("dwcp-cluster-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let address = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let mut members: Vec<Member> = (0..3)
        .map(|i| start_member(&base, i as u64 + 1, ports[i], "", false))
        .collect();
    for m in &members {
        assert_eq!(m.status().role, "unfounded");
        let refused = m.call(Command::ClusterBudget {
            bits_per_second: Some(1_000_000),
        });
        let error = refused.error.unwrap_or_default();
        assert!(error.contains("in no cluster yet"), "{error}");
    }
    // Joining before anyone founded: nobody answers at that address as a member.
    let nobody = members[1].call(Command::ClusterJoinAt {
        address: format!("127.0.0.1:{}", free_port()),
    });
    let error = nobody.error.unwrap_or_default();
    assert!(error.contains("no cluster member answers"), "{error}");

    let founded = members[0].call(Command::ClusterInit);
    assert!(founded.ok, "{founded:?}");
    wait_until("the founder leads", Duration::from_secs(10), || {
        members[0].status().role == "leader"
    });
    let again = members[0].call(Command::ClusterInit);
    assert!(
        again.error.unwrap_or_default().contains("already member 1"),
        "init twice"
    );

    // 2 joins through the founder (the leader); 3 through 2 (a follower, which names
    // the leader).
    let joined = members[1].call(Command::ClusterJoinAt {
        address: address(0),
    });
    assert!(joined.ok, "{joined:?}: {}", members[1].log());
    wait_until("2 follows 1", Duration::from_secs(10), || {
        let s = members[1].status();
        s.leader == 1 && s.members.len() == 2
    });
    let joined = members[2].call(Command::ClusterJoinAt {
        address: address(1),
    });
    assert!(joined.ok, "{joined:?}: {}", members[2].log());
    wait_until("three members everywhere", Duration::from_secs(10), || {
        members
            .iter()
            .all(|m| m.status().members.len() == 3 && m.status().leader == 1)
    });
    let again = members[2].call(Command::ClusterJoinAt {
        address: address(0),
    });
    assert!(
        again.error.unwrap_or_default().contains("already member 3"),
        "join twice"
    );
    // Another appliance that takes an id in use is refused by the leader.
    let impostor_port = free_port();
    let impostor = start_member_in(&base.join("impostor"), 2, impostor_port, "", false);
    let refused = impostor.call(Command::ClusterJoinAt {
        address: address(0),
    });
    let error = refused.error.unwrap_or_default();
    assert!(error.contains("appliance id 2 is taken"), "{error}");
    drop(impostor);

    // A flag set on the last to join applies on all.
    let answer = members[2].call(Command::FlagSet {
        name: "rollout".into(),
        value: "30".into(),
    });
    assert!(answer.ok, "{answer:?}");
    wait_until("rollout on every member", Duration::from_secs(5), || {
        members.iter().all(|m| m.flags().rollout_percent == 30)
    });

    // 2 restarts with no members in its configuration: its log says who they are, and
    // it catches up with a change made while it was down.
    members[1].kill();
    let answer = members[0].call(Command::FlagSet {
        name: "rollout".into(),
        value: "60".into(),
    });
    assert!(answer.ok, "{answer:?}");
    members[1].start();
    wait_until("2 is back and caught up", Duration::from_secs(15), || {
        let s = members[1].status();
        s.role == "follower" && s.members.len() == 3 && members[1].flags().rollout_percent == 60
    });
    let status = members[1].status();
    for m in &status.members {
        assert_ne!(m.address, "(unknown)", "{status:#?}");
    }
    drop(members);
    let _ = std::fs::remove_dir_all(&base);
    eprintln!(
        "cluster founded at run time (init, two joins, a restart): {:.1} s",
        start.elapsed().as_secs_f64()
    );
}
