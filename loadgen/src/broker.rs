//! A broker of loadgen's own for quick local runs (no `--bootstrap`): `ringlog serve` in a
//! temporary data directory on free loopback ports, stopped and removed when the run ends.
//!
//! Owns: finding the `ringlog` binary (next to loadgen's executable, else on PATH), starting it
//! with both its native and its Kafka listener, reading its `ringlog ready:` line, and stopping it
//! with SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::LoadgenError;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct LocalBroker {
    child: Option<Child>,
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub native: String,
    /// The Kafka listener, if the broker has one.
    pub kafka: Option<String>,
    pub shards: Option<u32>,
    pub admin: Option<String>,
    pub log: PathBuf,
}

/// `ringlog` next to this executable (a cargo target directory or an install prefix), else on PATH.
pub fn find_binary() -> Option<PathBuf> {
    let beside = std::env::current_exe().ok().and_then(|exe| {
        // Test binaries live one level down, in target/<profile>/deps.
        let dir = exe.parent()?.to_path_buf();
        [dir.join("ringlog"), dir.parent()?.join("ringlog")].into_iter().find(|p| p.is_file())
    });
    beside.or_else(|| {
        std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("ringlog")).find(|p| p.is_file()))
    })
}

impl LocalBroker {
    /// Starts `ringlog serve` with `sets` as extra `--set KEY=VALUE` options.
    pub fn start(binary: &Path, shards: Option<usize>, sets: &[String]) -> Result<LocalBroker, LoadgenError> {
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("ringlog-loadgen-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|source| LoadgenError::Io { what: format!("creating {}", dir.display()), source })?;
        let log = dir.join("broker.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|source| LoadgenError::Io { what: format!("creating {}", log.display()), source })?;
        let mut cmd = Command::new(binary);
        cmd.arg("serve").arg("--data-dir").arg(dir.join("data")).args([
            "--listen",
            "127.0.0.1:0",
            "--shard-port-base",
            "0",
            "--kafka-listen",
            "127.0.0.1:0",
            "--set",
            "admin_listen=127.0.0.1:0",
        ]);
        if let Some(n) = shards {
            cmd.args(["--shards", &n.to_string()]);
        }
        for s in sets {
            cmd.args(["--set", s]);
        }
        let mut child = cmd
            .env("RINGLOG_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|source| LoadgenError::Io { what: format!("starting {}", binary.display()), source })?;
        let stdout =
            child.stdout.take().ok_or_else(|| LoadgenError::Broker("broker stdout not captured".into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep reading so the broker never blocks on a full stdout pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut broker = LocalBroker {
            child: Some(child),
            binary: binary.to_path_buf(),
            dir,
            native: String::new(),
            kafka: None,
            shards: None,
            admin: None,
            log,
        };
        let line = rx.recv_timeout(READY_TIMEOUT).map_err(|_| {
            LoadgenError::Broker(format!(
                "{} did not print its ready line within {} s; its log: {}",
                binary.display(),
                READY_TIMEOUT.as_secs(),
                broker.log.display()
            ))
        })?;
        let ready = parse_ready_line(&line).ok_or_else(|| {
            LoadgenError::Broker(format!(
                "unexpected first line from the broker: {line:?} (log: {})",
                broker.log.display()
            ))
        })?;
        broker.native = ready.native;
        broker.kafka = ready.kafka;
        broker.shards = ready.shards;
        broker.admin = ready.admin;
        Ok(broker)
    }

    /// `ringlog --version`, for the report.
    pub fn version(&self) -> Option<String> {
        let out = Command::new(&self.binary).arg("--version").output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// SIGTERM, wait, remove the data directory (the log too, unless the broker failed).
    pub fn stop(mut self) -> Result<(), LoadgenError> {
        let result = self.terminate();
        if result.is_ok() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        result
    }

    fn terminate(&mut self) -> Result<(), LoadgenError> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        // SAFETY: kill(2) on the pid of a child we own and have not reaped; SIGTERM makes the
        // broker flush and exit cleanly.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(LoadgenError::Broker(format!(
                        "the local broker exited with {status}; its log: {}",
                        self.log.display()
                    )))
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(LoadgenError::Broker(format!(
                        "the local broker did not stop within {} s; killed it (log: {})",
                        STOP_TIMEOUT.as_secs(),
                        self.log.display()
                    )));
                }
            }
        }
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the broker's ready line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    pub native: String,
    /// `None` when the line says `kafka=off` (or, from an older broker, nothing).
    pub kafka: Option<String>,
    pub shards: Option<u32>,
    pub admin: Option<String>,
}

/// `ringlog ready: native=HOST:PORT kafka=HOST:PORT shards=N direct=... data_dir=PATH
/// admin=HOST:PORT`; `None` without a native address.
pub fn parse_ready_line(line: &str) -> Option<ReadyLine> {
    let rest = line.strip_prefix("ringlog ready:")?;
    let (mut native, mut kafka, mut shards, mut admin) = (None, None, None, None);
    for field in rest.split_whitespace() {
        if let Some(v) = field.strip_prefix("native=") {
            native = Some(v.to_string());
        }
        if let Some(v) = field.strip_prefix("kafka=") {
            kafka = (v != "off").then(|| v.to_string());
        }
        if let Some(v) = field.strip_prefix("shards=") {
            shards = v.parse().ok();
        }
        if let Some(v) = field.strip_prefix("admin=") {
            admin = (v != "none").then(|| v.to_string());
        }
    }
    Some(ReadyLine { native: native?, kafka, shards, admin })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_fields() {
        let line = "ringlog ready: native=127.0.0.1:4000 kafka=127.0.0.1:4005 shards=2 \
                    direct=127.0.0.1:4001,127.0.0.1:4002 data_dir=/tmp/x admin=127.0.0.1:4003";
        assert_eq!(
            parse_ready_line(line),
            Some(ReadyLine {
                native: "127.0.0.1:4000".into(),
                kafka: Some("127.0.0.1:4005".into()),
                shards: Some(2),
                admin: Some("127.0.0.1:4003".into()),
            })
        );
        let off =
            parse_ready_line("ringlog ready: native=127.0.0.1:4000 kafka=off shards=1 admin=none").unwrap();
        assert_eq!((off.kafka, off.admin), (None, None));
        assert_eq!(parse_ready_line("ringlog ready: shards=2"), None);
        assert_eq!(parse_ready_line("hello"), None);
    }
}
