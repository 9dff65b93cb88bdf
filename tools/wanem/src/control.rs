//! The live-change socket: one JSON request per line on a Unix socket, one JSON
//! response line back. `wanem set` and `wanem status` are its clients; tests and
//! benchmarks can speak it directly to turn one kind of link into another mid-run.
//!
//! Requests (`op` selects):
//! - `{"op":"set","direction":"both|forward|reverse","scenario":"lossy","changes":{"delay":"40ms"}}`
//!   — start from a scenario's links (optional), apply the changes (optional);
//! - `{"op":"status"}` — description, current links and counters;
//! - `{"op":"down"}` — ask the emulator to stop.
//!
//! Responses carry `"ok": true` or `"ok": false` with an `"error"` text.

use crate::forward::{Direction, LinkControl};
use crate::scenario::{LinkChanges, Scenario};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// A request longer than this is refused.
const MAX_REQUEST: u64 = 64 * 1024;
/// A client that sends nothing for this long is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Set {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        direction: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scenario: Option<String>,
        #[serde(default)]
        changes: Box<LinkChanges>,
    },
    Status,
    Down,
}

/// What the emulator is, for `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Description {
    pub name: String,
    pub scenario: String,
    pub mtu: u32,
    pub seed: u64,
    pub source_namespace: String,
    pub destination_namespace: String,
    pub source_address: Ipv4Addr,
    pub destination_address: Ipv4Addr,
    pub device: String,
}

/// Parses `both`, `forward` or `reverse` (`None` is both).
pub fn parse_direction(text: Option<&str>) -> Result<Option<Direction>, String> {
    match text {
        None | Some("both") => Ok(None),
        Some("forward") => Ok(Some(Direction::Forward)),
        Some("reverse") => Ok(Some(Direction::Reverse)),
        Some(other) => Err(format!(
            "direction `{other}`: one of both, forward, reverse"
        )),
    }
}

/// Applies a scenario's links (if given) and then `changes` to the chosen directions.
/// Nothing changes unless every direction's result is valid.
pub fn apply(
    link: &LinkControl,
    direction: Option<Direction>,
    scenario: Option<&Scenario>,
    changes: &LinkChanges,
) -> Result<(), Vec<String>> {
    let directions: Vec<Direction> = match direction {
        Some(d) => vec![d],
        None => Direction::BOTH.to_vec(),
    };
    let mut updated = Vec::new();
    let mut problems = Vec::new();
    for d in directions {
        let base = match scenario {
            Some(s) if d == Direction::Forward => s.forward.clone(),
            Some(s) => s.reverse.clone(),
            None => link.spec(d),
        };
        match changes.apply_to(&base, d.name()) {
            Ok(spec) => updated.push((d, spec)),
            Err(mut p) => problems.append(&mut p),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    for (d, spec) in updated {
        link.set(d, spec);
    }
    Ok(())
}

/// The socket server: one thread, one client at a time (requests are tiny; a client
/// that stalls is cut off after `CLIENT_TIMEOUT`, 2 s).
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// `on_down` runs when a client asks the emulator to stop; without it such
    /// requests are refused.
    pub fn start(
        path: &Path,
        description: Description,
        link: Arc<LinkControl>,
        on_down: Option<fn()>,
    ) -> std::io::Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A socket file left by a dead emulator would make bind fail; the namespace
        // check already proved no live emulator has this name.
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("wanem-control".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Ok(stream) = stream {
                            serve(stream, &description, &link, on_down);
                        }
                    }
                })?
        };
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept call.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, description: &Description, link: &LinkControl, on_down: Option<fn()>) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut line = String::new();
    let Ok(reader_stream) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader_stream.take(MAX_REQUEST + 1));
    let response = match reader.read_line(&mut line) {
        Ok(0) => return,
        Ok(n) if n as u64 > MAX_REQUEST => {
            json!({"ok": false, "error": format!("request longer than {MAX_REQUEST} bytes")})
        }
        Ok(_) => handle(line.trim(), description, link, on_down),
        Err(e) => json!({"ok": false, "error": format!("reading the request: {e}")}),
    };
    let mut stream = stream;
    let _ = writeln!(stream, "{response}");
}

fn handle(
    line: &str,
    description: &Description,
    link: &LinkControl,
    on_down: Option<fn()>,
) -> Value {
    let request: Request = match serde_json::from_str(line) {
        Ok(request) => request,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match request {
        Request::Status => json!({
            "ok": true,
            "emulator": description,
            "forward": {"link": link.spec(Direction::Forward), "stats": link.stats(Direction::Forward)},
            "reverse": {"link": link.spec(Direction::Reverse), "stats": link.stats(Direction::Reverse)},
        }),
        Request::Set {
            direction,
            scenario,
            changes,
        } => {
            let direction = match parse_direction(direction.as_deref()) {
                Ok(d) => d,
                Err(e) => return json!({"ok": false, "error": e}),
            };
            let scenario = match scenario.as_deref().map(Scenario::load).transpose() {
                Ok(s) => s,
                Err(e) => return json!({"ok": false, "error": e.to_string()}),
            };
            if scenario.is_none() && changes.is_empty() {
                return json!({"ok": false, "error": "nothing to change: give a scenario or changes"});
            }
            match apply(link, direction, scenario.as_ref(), &changes) {
                Ok(()) => json!({
                    "ok": true,
                    "forward": link.spec(Direction::Forward),
                    "reverse": link.spec(Direction::Reverse),
                }),
                Err(problems) => json!({"ok": false, "error": problems.join("; ")}),
            }
        }
        Request::Down => match on_down {
            Some(down) => {
                down();
                json!({"ok": true})
            }
            None => {
                json!({"ok": false, "error": "this emulator is stopped by its owner, not by request"})
            }
        },
    }
}

/// Sends one request and returns the response (an `ok: false` response is an error).
pub fn request(path: &Path, request: &Request) -> Result<Value, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the emulator at {}: {e} (is `wanem up` running with this --name?)",
            path.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let text = serde_json::to_string(request).map_err(|e| e.to_string())?;
    writeln!(stream, "{text}").map_err(|e| format!("sending the request: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("reading the response: {e}"))?;
    let value: Value =
        serde_json::from_str(&line).map_err(|e| format!("bad response `{}`: {e}", line.trim()))?;
    if value["ok"] == Value::Bool(true) {
        Ok(value)
    } else {
        Err(value["error"]
            .as_str()
            .unwrap_or("request refused")
            .to_string())
    }
}
