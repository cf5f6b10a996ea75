//! Process-wide set-up shared by the long-running daemons (`margay node run`, `margay reflector`).
//!
//! Why: margay is one binary with ~11 MB of machine code (BGP, IPAM, CNI, netlink, etcd's gRPC client,
//! the HTTP API, the CLI). A daemon runs only part of it, but the kernel's fault-around maps the 64 KiB
//! around every code page that faults in, and the pages a daemon runs are spread over the whole text,
//! so nearly all of it ends up resident: measured 6.4 MB of text plus 1.3 MB of read-only data in a
//! route reflector whose heap was 3 MB. Marking the binary's own read-only mappings `MADV_RANDOM` turns
//! fault-around (and read-ahead) off for them, so a daemon keeps resident only the pages it touches. The
//! pages are file-backed and clean: this changes what is counted in the daemon's RSS, and costs one
//! minor fault per 4 KiB code page the first time it runs.

/// Ask the kernel to map only the touched pages of this executable's read-only and code mappings. Best
/// effort: any failure leaves the default behaviour and is logged at debug level.
pub fn map_only_touched_code() {
    let exe = match std::fs::read_link("/proc/self/exe") {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read /proc/self/exe; code residency left as it is");
            return;
        }
    };
    let maps = match std::fs::read_to_string("/proc/self/maps") {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read /proc/self/maps; code residency left as it is");
            return;
        }
    };
    let exe = exe.to_string_lossy();
    for (start, end) in own_readonly_mappings(&maps, &exe) {
        // SAFETY: the range is a whole mapping of this process taken from /proc/self/maps; MADV_RANDOM
        // only changes the kernel's paging hints for it and never its contents or protection.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_RANDOM) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), start, end, "madvise(MADV_RANDOM) failed");
        }
    }
}

/// The (start, end) of each mapping of `exe` that is readable and not writable (code and read-only data),
/// from the text of /proc/self/maps.
fn own_readonly_mappings(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3)?;
            if path != exe || !perms.starts_with('r') || perms.as_bytes().get(1) == Some(&b'w') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_executables_readonly_mappings_only() {
        let maps = "\
55e8c8eae000-55e8c919a000 r--p 00000000 fe:00 5423172 /usr/bin/margay
55e8c919b000-55e8c9c30000 r-xp 002ec000 fe:00 5423172 /usr/bin/margay
55e8c9cc1000-55e8c9cc7000 rw-p 00e10000 fe:00 5423172 /usr/bin/margay
7f0000000000-7f0000001000 r-xp 00000000 fe:00 11 /usr/lib/libc.so.6
7f0000002000-7f0000003000 rw-p 00000000 00:00 0
";
        assert_eq!(
            own_readonly_mappings(maps, "/usr/bin/margay"),
            vec![
                (0x55e8c8eae000, 0x55e8c919a000),
                (0x55e8c919b000, 0x55e8c9c30000)
            ]
        );
    }

    /// The kernel shows MADV_RANDOM as the `rr` flag in a mapping's VmFlags (proc(5)).
    #[test]
    fn the_test_binarys_code_is_marked_random_access() {
        map_only_touched_code();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_string_lossy().to_string();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_code = false;
        let mut seen = false;
        for line in smaps.lines() {
            if line.contains(" r-xp ") {
                in_code = line.ends_with(&exe);
            } else if in_code && line.starts_with("VmFlags:") {
                assert!(line.split_whitespace().any(|f| f == "rr"), "{line}");
                seen = true;
            }
        }
        assert!(seen, "no code mapping of {exe} in /proc/self/smaps");
    }
}
