//! Shared harness for end-to-end tests: real `ringlog` broker processes on free loopback ports,
//! in their own temporary data directories, driven through the real CLI and client.
#![allow(dead_code)]

pub mod cluster;
pub mod kafka;
pub mod relay;
pub mod wire;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Lowest port handed out by [`consecutive_free_ports`].
const TEST_PORTS_LOW: u32 = 10_000;

/// `count` consecutive loopback ports for listeners a broker under test binds itself (peer,
/// Kafka, a shard port base and the next). Taken below the kernel's ephemeral range: a port
/// bound at 0 and released comes from that range, and any outgoing connection of this process —
/// another test's client — may take it before the broker binds it (CI saw a peer listener
/// refused, "address already in use, held by" the test binary). Each port is handed out once per
/// process, processes start apart, and a port is checked free by binding it.
pub fn consecutive_free_ports(count: usize) -> Vec<u16> {
    static HANDED_OUT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .min(u32::from(u16::MAX));
    assert!(ephemeral_low > TEST_PORTS_LOW + 1_000, "the ephemeral range starts at {ephemeral_low}");
    let span = ephemeral_low - TEST_PORTS_LOW;
    let start = std::process::id().wrapping_mul(7_919) % span;
    let count = count as u32;
    loop {
        let n = HANDED_OUT.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        assert!(n < span, "handed out every test port below {ephemeral_low}");
        let first = TEST_PORTS_LOW + (start + n) % span;
        if first + count > ephemeral_low {
            continue;
        }
        let ports: Vec<u16> = (first..first + count).map(|p| p as u16).collect();
        if ports.iter().all(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return ports;
        }
    }
}

/// `n` loopback ports (see [`consecutive_free_ports`]), not necessarily adjacent.
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| consecutive_free_ports(1)[0]).collect()
}

pub const BIN: &str = env!("CARGO_BIN_EXE_ringlog");

pub struct Broker {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub addr: String,
    /// The Kafka listener, `host:port`.
    pub kafka: String,
    pub direct: Vec<String>,
    /// The admin HTTP listener, `host:port`.
    pub admin: String,
    pub args: Vec<String>,
    /// RLIMIT_NOFILE (soft and hard) the broker process starts with, at every (re)start.
    pub open_files_limit: Option<u64>,
    _tmp: Option<tempfile::TempDir>,
    log: PathBuf,
}

impl Broker {
    /// Starts a broker with `shards` shards and extra `--set` options, on free ports.
    pub fn start(shards: usize, sets: &[&str]) -> Broker {
        let tmp = tempfile::Builder::new().prefix("ringlog-test").tempdir_in(test_root()).unwrap();
        let dir = tmp.path().to_path_buf();
        let mut b = Broker::start_in(&dir, shards, sets);
        b._tmp = Some(tmp);
        b
    }

    /// Starts a broker whose process may open at most `open_files` descriptors.
    pub fn start_limited(shards: usize, sets: &[&str], open_files: u64) -> Broker {
        let tmp = tempfile::Builder::new().prefix("ringlog-test").tempdir_in(test_root()).unwrap();
        let dir = tmp.path().to_path_buf();
        let mut b = Broker::prepare(&dir, shards, sets);
        b._tmp = Some(tmp);
        b.open_files_limit = Some(open_files);
        b.launch();
        b
    }

    /// Starts a broker on an existing data directory (for restarts).
    pub fn start_in(dir: &Path, shards: usize, sets: &[&str]) -> Broker {
        let mut b = Broker::prepare(dir, shards, sets);
        b.launch();
        b
    }

    /// The command line of a broker on `dir`, not started.
    fn prepare(dir: &Path, shards: usize, sets: &[&str]) -> Broker {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--shard-port-base".into(),
            "0".into(),
            "--shards".into(),
            shards.to_string(),
            "--set".into(),
            "free_space_reserve_bytes=1048576".into(),
            "--kafka-listen".into(),
            "127.0.0.1:0".into(),
        ];
        for s in sets {
            args.push("--set".into());
            args.push(s.to_string());
        }
        Broker {
            child: None,
            dir: dir.to_path_buf(),
            addr: String::new(),
            kafka: String::new(),
            direct: vec![],
            admin: String::new(),
            args,
            open_files_limit: None,
            _tmp: None,
            log: dir.join("broker.log"),
        }
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        // Benchmarks written as ignored tests run a release build the same way.
        let bin = std::env::var("TEST_BROKER_BIN").unwrap_or_else(|_| BIN.to_string());
        let mut command = Command::new(bin);
        command.args(&self.args).env("RINGLOG_LOG", "info").stdout(Stdio::piped()).stderr(Stdio::from(log));
        if let Some(max) = self.open_files_limit {
            limit_open_files(&mut command, max, 0);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            panic!(
                "broker did not become ready; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        });
        assert!(line.starts_with("ringlog ready:"), "unexpected first line: {line}");
        for field in line.split_whitespace() {
            if let Some(v) = field.strip_prefix("native=") {
                self.addr = v.to_string();
            }
            if let Some(v) = field.strip_prefix("kafka=") {
                self.kafka = v.to_string();
            }
            if let Some(v) = field.strip_prefix("admin=") {
                self.admin = v.to_string();
            }
            if let Some(v) = field.strip_prefix("direct=") {
                self.direct = v.split(',').map(str::to_string).collect();
            }
        }
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; asserts a clean exit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("broker running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        assert!(status.success(), "broker exited with {status:?}; log:\n{}", self.log());
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("broker running");
        child.kill().unwrap();
        let _ = child.wait();
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        self.launch();
    }

    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Runs a `ringlog` client command against this broker.
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> CliOutput {
        run_cli(&self.addr, args, stdin)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct CliOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    #[track_caller]
    pub fn ok(self) -> String {
        assert!(self.status.success(), "cli failed: {}\n{}", self.status, self.stderr);
        self.stdout
    }
}

pub fn run_cli(bootstrap: &str, args: &[&str], stdin: Option<&[u8]>) -> CliOutput {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RINGLOG_BOOTSTRAP", bootstrap)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(data) = stdin {
        let mut input = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
    }
    let out = child.wait_with_output().unwrap();
    CliOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Makes `command`'s process start with RLIMIT_NOFILE `max` (soft and hard) and `taken`
/// descriptors already open (inherited copies of stderr), so only `max - taken` remain for it.
pub fn limit_open_files(command: &mut Command, max: u64, taken: usize) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls run (setrlimit, dup), and no
    // memory is allocated.
    unsafe {
        command.pre_exec(move || {
            for _ in 0..taken {
                if libc::dup(2) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let limit = libc::rlimit { rlim_cur: max, rlim_max: max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Test data lives on the real disk (O_DIRECT needs a real filesystem, not tmpfs).
pub fn test_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&root).unwrap();
    root
}

/// Segment files of one partition, sorted by base offset.
pub fn segments(data_dir: &Path, topic: &str, partition: u32) -> Vec<PathBuf> {
    let dir = data_dir.join("topics").join(topic).join(partition.to_string());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}
