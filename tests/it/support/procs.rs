//! Redis and NATS servers of a test's own, on free loopback ports with their
//! data in a temporary folder, so a test may `kill -9` and restart them (the
//! shared servers on 6379 and 4222 are never touched), and so a benchmark
//! can attribute their CPU time. Without the binaries the test is skipped,
//! or fails under `BATON_REQUIRE_BACKENDS=1` (see [`skip`]).
//!
//! Durability across `kill -9`: Redis writes its append-only file with
//! `appendfsync always`, so what it acknowledged is in the file before the
//! reply (with `--save ""`, no snapshots). nats-server 2.9 has no
//! `sync_interval`: JetStream's file store writes each message to the file
//! before the publish ack and fsyncs in the background, which survives the
//! death of the process (the page cache is the kernel's), not of the machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, skip, Baton};

/// The path of `binary` on `PATH`, if any.
pub fn find_binary(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// User + system CPU time of a process so far, from `/proc/<pid>/stat`
/// (USER_HZ = 100 on Linux).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces; the fields after it are fixed.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, so 12 and 13
    // after the state (field 3).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Resident memory of a process, KiB (Linux).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

impl Baton {
    /// Whether the process ended by itself (then it is reaped).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(|child| child.try_wait()) {
            Some(Ok(Some(_))) | Some(Err(_)) => {
                self.child = None;
                true
            }
            Some(Ok(None)) => false,
            None => true,
        }
    }
}

/// Which server a [`OwnServer`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Redis,
    Nats,
}

/// A `redis-server` or a `nats-server` (JetStream) of this test, restarted
/// on the same port and data folder. Killed when dropped.
pub struct OwnServer {
    pub kind: ServerKind,
    binary: PathBuf,
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnServer {
    /// Starts one, or says SKIPPED (None) when its binary is not installed.
    pub fn start(test: &str, kind: ServerKind) -> Option<OwnServer> {
        let name = match kind {
            ServerKind::Redis => "redis-server",
            ServerKind::Nats => "nats-server",
        };
        let Some(binary) = find_binary(name) else {
            skip(test, &format!("no {name} on PATH"));
            return None;
        };
        let mut server = OwnServer {
            kind,
            binary,
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        match self.kind {
            ServerKind::Redis => format!("redis://127.0.0.1:{}", self.port),
            ServerKind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on its port and folder, and waits until it
    /// answers: Redis `PING` (after loading its append-only file), NATS a
    /// JetStream request.
    pub fn restart(&mut self) {
        self.kill_9();
        let port = self.port.to_string();
        let mut command = Command::new(&self.binary);
        match self.kind {
            ServerKind::Redis => {
                command
                    .args(["--port", &port, "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "yes"])
                    .args(["--appendfsync", "always", "--dir"])
                    .arg(self.dir.path());
            }
            ServerKind::Nats => {
                command
                    .args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"])
                    .arg(self.dir.path());
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {}: {err}", self.binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "{:?} on port {} did not come up",
                self.kind,
                self.port
            );
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("{:?} on port {} exited: {status}", self.kind, self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn answers(&self) -> bool {
        match self.kind {
            ServerKind::Redis => redis::Client::open(self.url())
                .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(1)))
                .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn))
                .is_ok(),
            // The client port opens once JetStream has recovered its streams.
            ServerKind::Nats => std::net::TcpStream::connect_timeout(
                &format!("127.0.0.1:{}", self.port).parse().unwrap(),
                Duration::from_secs(1),
            )
            .is_ok(),
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill_9();
    }
}

impl super::NodeApp {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}
