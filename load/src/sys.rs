//! Process figures from /proc (Linux): memory and CPU time of the servers
//! (`--server-pid`) and of this tool, the load average, and the open-file
//! limits a run needs.

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{Fatal, fatal, stats::round2};

/// File descriptors the tool needs beyond one per connection.
const FD_SLACK: u64 = 64;

/// (soft, hard) of RLIMIT_NOFILE of a process, from /proc.
fn fd_limits(pid: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let l = s.lines().find(|l| l.starts_with("Max open files"))?;
    let mut it = l.split_whitespace().skip(3);
    let soft = it.next()?;
    let hard = it.next()?;
    let parse = |v: &str| if v == "unlimited" { Some(u64::MAX) } else { v.parse().ok() };
    Some((parse(soft)?, parse(hard)?))
}

/// VmRSS in KiB (`pid` is a number or `self`).
pub fn rss_kib(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Summed VmRSS of the servers in KiB; `None` without `--server-pid` or when
/// one cannot be read.
pub fn servers_rss_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| rss_kib(&p.to_string())).sum()
}

/// utime + stime of a process in seconds (clock ticks of 1/100 s, as on Linux).
fn cpu_s(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU time of the servers and of this tool at one moment, to report what a phase cost.
pub struct CpuMark {
    at: Instant,
    servers: Option<f64>,
    client: Option<f64>,
}

impl CpuMark {
    pub fn now(pids: &[u32]) -> CpuMark {
        let servers = if pids.is_empty() { None } else { pids.iter().map(|p| cpu_s(&p.to_string())).sum() };
        CpuMark { at: Instant::now(), servers, client: cpu_s("self") }
    }

    /// `{"wall_s", "server_cpu_s", "client_cpu_s"}` since this mark.
    pub fn since(&self, pids: &[u32]) -> Value {
        let end = CpuMark::now(pids);
        let d = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => json!(round2(b - a)),
            _ => Value::Null,
        };
        json!({
            "wall_s": round2(end.at.duration_since(self.at).as_secs_f64()),
            "server_cpu_s": d(self.servers, end.servers),
            "client_cpu_s": d(self.client, end.client),
        })
    }
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg has them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Refuses to start when this process cannot hold `conns` sockets; warns when
/// a server may not.
pub fn check_fds(conns: usize, pids: &[u32]) -> Result<(), Fatal> {
    let need = conns as u64 + FD_SLACK;
    if let Some((soft, hard)) = fd_limits("self")
        && soft < need
    {
        let advice = if hard >= need {
            format!("run `ulimit -n {hard}` in this shell first (the hard limit is {hard})")
        } else {
            format!(
                "the hard limit is {hard}: lower the count, or raise the hard limit (limits.conf / systemd LimitNOFILE)"
            )
        };
        return Err(fatal(format!(
            "{conns} connections need about {need} file descriptors but the soft limit (RLIMIT_NOFILE) is {soft}: {advice}"
        )));
    }
    for pid in pids {
        if let Some((soft, _)) = fd_limits(&pid.to_string()) {
            let share = conns as u64 / pids.len() as u64 + FD_SLACK;
            if soft < share {
                eprintln!(
                    "warning: server pid {pid} may open only {soft} files; it needs about {share} \
                     (start it after `ulimit -n 20000`)"
                );
            }
        }
    }
    Ok(())
}
