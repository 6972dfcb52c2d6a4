//! A `redis-server` (or sentinel) process of the test's own, on a loopback port, for tests
//! that kill, pause or fail over Redis — doing that to the shared Redis would stall every
//! other test.

use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// A free loopback port (the OS's choice), for a process the test starts.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One redis-server (or sentinel) process, killed on drop.
#[derive(Debug)]
pub(crate) struct RedisProcess {
    /// The port it listens on.
    pub(crate) port: u16,
    child: Option<Child>,
}

impl RedisProcess {
    /// Runs `redis-server ARGS` (which must make it listen on `port`) and waits until it
    /// takes connections.
    pub(crate) async fn start(port: u16, args: &[String]) -> Self {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            port,
            child: Some(child),
        }
    }

    /// A redis-server on a free port keeping nothing on disk, plus `extra` arguments.
    pub(crate) async fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let mut args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self::start(port, &args).await
    }

    /// Its URL, database 0.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Its process id, while it runs.
    pub(crate) fn pid(&self) -> String {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("running")
            .to_string()
    }

    /// Sends it `signal` with kill(1) (`-STOP`, `-CONT`, …).
    pub(crate) async fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid()])
            .status()
            .await
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub(crate) async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill -9");
            let _ = child.wait().await;
        }
    }

    /// Runs `redis-cli -p PORT ARGS` and answers what it printed, trimmed.
    pub(crate) async fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}
