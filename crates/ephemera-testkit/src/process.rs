//! One node process: spawn, signal, stop, and knowing when it is gone.
//!
//! The problem: a node holds sled's lock on its data directory until its last thread has
//! exited, and SIGKILL only starts that. A restart that spawns the new process as soon as the
//! signal is sent races the old one's exit, and the new node fails to open its store. A
//! process started by someone else (a node that `ephemera dev` spawned) cannot be waited for
//! with `waitpid`, and becomes a zombie whose leader thread is dead while the others may still
//! run with the files open.
//!
//! The invariant: [`NodeProcess::kill9`] and [`NodeProcess::terminate`] return only once the
//! process is gone, so the next spawn finds the lock free. For our own child, gone means
//! reaped: the kernel reports a multi-threaded process to `waitpid` only after every thread
//! has exited. For an adopted process, gone means absent from `/proc`, or a zombie with no
//! thread but its leader. A process that outlives the deadline is reported, not ignored.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{io, Error, Result};

/// How long a killed process may take to be gone (a loaded machine, a large sled cache).
const KILL_DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// Sends `signal` to `pid`. Only for processes the caller started.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a process id, no memory involved; the caller started the process.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

pub struct NodeProcess {
    pid: u32,
    /// `None` for an adopted process.
    child: Option<Child>,
    paused: bool,
    gone: bool,
}

impl NodeProcess {
    /// Starts `bin server --config CONFIG`, appending its output to `log`.
    pub fn spawn(bin: &Path, config: &Path, log: &Path) -> Result<Self> {
        let out = io(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log),
            || format!("cannot open {}", log.display()),
        )?;
        let err = io(out.try_clone(), || "cannot duplicate a log handle".into())?;
        let child = io(
            Command::new(bin)
                .arg("server")
                .arg("--config")
                .arg(config)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn(),
            || format!("cannot start {}", bin.display()),
        )?;
        Ok(NodeProcess {
            pid: child.id(),
            child: Some(child),
            paused: false,
            gone: false,
        })
    }

    /// A node process someone else started (and will reap), e.g. one of `ephemera dev`'s.
    pub fn adopt(pid: u32) -> Self {
        NodeProcess {
            pid,
            child: None,
            paused: false,
            gone: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Started by this handle (not adopted).
    pub fn is_own(&self) -> bool {
        self.child.is_some()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// SIGSTOP: the process keeps its sockets and files but does nothing.
    pub fn pause(&mut self) {
        if !self.gone {
            signal(self.pid, libc::SIGSTOP);
            self.paused = true;
        }
    }

    pub fn resume(&mut self) {
        if !self.gone {
            signal(self.pid, libc::SIGCONT);
            self.paused = false;
        }
    }

    /// Whether the process is gone (see the module doc); reaps our own child.
    pub fn is_gone(&mut self) -> bool {
        if !self.gone {
            self.gone = match &mut self.child {
                Some(c) => !matches!(c.try_wait(), Ok(None)),
                None => adopted_is_gone(self.pid),
            };
        }
        self.gone
    }

    /// `kill -9`, then waits until the process is gone.
    pub fn kill9(&mut self) -> Result<()> {
        if !self.is_gone() {
            signal(self.pid, libc::SIGKILL);
        }
        self.paused = false;
        let deadline = Instant::now() + KILL_DEADLINE;
        while !self.is_gone() {
            if Instant::now() >= deadline {
                return Err(self.outlived("SIGKILL", KILL_DEADLINE));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// SIGTERM (after SIGCONT, should it be paused) for a graceful stop; `kill -9` when it
    /// has not exited `within`.
    pub fn terminate(&mut self, within: Duration) -> Result<()> {
        let deadline = self.send_term(within);
        while !self.is_gone() {
            if Instant::now() >= deadline {
                return self.kill9();
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// [`NodeProcess::terminate`] for async callers: the wait does not hold a runtime thread.
    pub async fn terminate_async(&mut self, within: Duration) -> Result<()> {
        let deadline = self.send_term(within);
        while !self.is_gone() {
            if Instant::now() >= deadline {
                // SIGKILL is handled by the kernel at once: the rest of the wait is short.
                return self.kill9();
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    fn send_term(&mut self, within: Duration) -> Instant {
        if !self.is_gone() {
            signal(self.pid, libc::SIGCONT);
            signal(self.pid, libc::SIGTERM);
        }
        self.paused = false;
        Instant::now() + within
    }

    fn outlived(&self, what: &str, after: Duration) -> Error {
        Error::NotReady(format!(
            "process {} still runs {} s after {what}",
            self.pid,
            after.as_secs()
        ))
    }
}

impl Drop for NodeProcess {
    /// Our own child never outlives its handle (an error path in a harness leaves no node
    /// behind); an adopted process is its starter's to stop.
    fn drop(&mut self) {
        if self.child.is_some() && !self.is_gone() {
            let _ = self.kill9();
        }
    }
}

fn adopted_is_gone(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
    };
    let zombie = field("State:").starts_with('Z');
    let threads: u32 = field("Threads:").parse().unwrap_or(1);
    zombie && threads <= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in "binary" that ignores its arguments and runs until signalled: the process
    /// handling is the same whatever the program.
    fn sleeper(dir: &Path) -> std::path::PathBuf {
        let bin = dir.join("node.sh");
        std::fs::write(&bin, "#!/bin/sh\necho started\nexec sleep 600\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    fn state(pid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_string()))
            .unwrap_or_default()
    }

    #[test]
    fn kill_pause_resume_and_terminate_leave_no_process() {
        let dir = tempfile::tempdir().unwrap();
        let bin = sleeper(dir.path());
        let log = dir.path().join("node.log");
        let mut p = NodeProcess::spawn(&bin, Path::new("c.toml"), &log).unwrap();
        assert!(!p.is_gone());
        // Its output goes to the log (a condition, polled).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap().contains("started") {
            assert!(Instant::now() < deadline, "nothing in the log");
            std::thread::sleep(POLL);
        }
        p.pause();
        while !state(p.pid()).starts_with('T') {
            assert!(Instant::now() < deadline, "not stopped: {}", state(p.pid()));
            std::thread::sleep(POLL);
        }
        // A paused process stops gracefully too (SIGCONT goes first).
        p.terminate(Duration::from_secs(10)).unwrap();
        assert!(p.is_gone());
        assert!(
            !Path::new(&format!("/proc/{}", p.pid())).exists(),
            "not reaped"
        );

        let mut q = NodeProcess::spawn(&bin, Path::new("c.toml"), &log).unwrap();
        // Adopted, as a test adopts `ephemera dev`'s nodes: gone is seen through /proc.
        let mut adopted = NodeProcess::adopt(q.pid());
        assert!(!adopted.is_gone());
        adopted.kill9().unwrap();
        assert!(adopted.is_gone());
        assert!(q.is_gone(), "the owner reaps it");
    }
}
