//! Small helpers shared by the commands: durations, times, lists, signals.

use anyhow::{bail, Context, Result};

/// Parses `90`, `90s`, `5m`, `1h`, `1h30m`, `2d` into seconds.
pub fn parse_duration_s(text: &str) -> Result<u64> {
    let t = text.trim();
    if t.is_empty() {
        bail!("empty duration");
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => bail!("invalid duration {text:?}: unknown unit {c:?} (use s, m, h or d)"),
        };
        let n: u64 = num.parse().with_context(|| {
            format!("invalid duration {text:?}: expected a number before {c:?}")
        })?;
        total = total
            .checked_add(n.checked_mul(unit).context("duration overflows")?)
            .context("duration overflows")?;
        num.clear();
    }
    if !num.is_empty() {
        bail!("invalid duration {text:?}: trailing number without a unit");
    }
    Ok(total)
}

/// RFC 3339 UTC rendering of Unix milliseconds.
pub fn fmt_time(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

pub fn split_list(s: &Option<String>) -> Vec<String> {
    s.as_deref()
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// Keeps the server's secrets (the KEK, unsealed signing keys) out of core files and away from
/// other processes of the same user: no core dumps (`RLIMIT_CORE` 0) and not dumpable, which
/// also refuses `ptrace` attachment and `/proc/PID/mem` reads by unprivileged processes.
pub fn forbid_core_dumps() -> Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on this process with valid arguments.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
            bail!(
                "cannot disable core dumps: {}",
                std::io::Error::last_os_error()
            );
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            bail!(
                "cannot mark the process not dumpable: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The wall clock, Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long until the wall-clock time `at_ms` (zero once it has passed).
pub fn until_ms(at_ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(at_ms.saturating_sub(now_ms()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_s("90").unwrap(), 90);
        assert_eq!(parse_duration_s("5m").unwrap(), 300);
        assert_eq!(parse_duration_s("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration_s("2d").unwrap(), 172_800);
        assert!(parse_duration_s("5x").is_err());
        assert!(parse_duration_s("m").is_err());
        assert!(parse_duration_s("5m3").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(fmt_time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
