//! The files a process has mapped into memory, read from `/proc/PID/maps`.
//!
//! The serving process locks these before it serves swap (the plugin's
//! `safety` module): `mlockall(MCL_ONFAULT)` locks only the pages already
//! touched, and a page of code touched for the first time under memory
//! pressure is a page-cache read. That read can wait on reclaim, or on a
//! page another task's read-ahead has locked while that task waits in
//! reclaim for swap-out through this very server.

/// A readable mapping of a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMapping<'a> {
    pub start: usize,
    pub end: usize,
    pub path: &'a str,
}

impl FileMapping<'_> {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// The readable mappings of regular files in a `/proc/PID/maps` text.
/// Left out: anonymous memory, unreadable ranges (guard gaps between a
/// library's segments), device files (`/dev/…`: GPU apertures and shared
/// memory, not a file system's page cache), memfds, SysV shared memory and
/// deleted files.
pub fn file_mappings(maps: &str) -> impl Iterator<Item = FileMapping<'_>> {
    maps.lines().filter_map(parse)
}

/// One line: `START-END PERMS OFFSET DEV INODE [PATH]`, the path padded
/// with spaces and possibly containing spaces itself.
fn parse(line: &str) -> Option<FileMapping<'_>> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let readable = fields.next()?.starts_with('r');
    let path = fields.nth(3)?.trim_start();
    let special = path.starts_with("/dev/")
        || path.starts_with("/memfd:")
        || path.starts_with("/SYSV")
        || path.ends_with(" (deleted)");
    if !readable || !path.starts_with('/') || special {
        return None;
    }
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    (start < end).then_some(FileMapping { start, end, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a0a000 r--p 00000000 fe:01 1049          /usr/sbin/nbdkit
55d0c0a0a000-55d0c0a1e000 r-xp 0000a000 fe:01 1049          /usr/sbin/nbdkit
55d0c1c00000-55d0c1c21000 rw-p 00000000 00:00 0             [heap]
7f3a10000000-7f3a10021000 rw-p 00000000 00:00 0 
7f3a14000000-7f3a14400000 rw-s 00000000 00:05 2051          /dev/dri/renderD128
7f3a18000000-7f3a18001000 ---p 00000000 00:00 0 
7f3a20000000-7f3a20200000 rw-s 00000000 00:01 77            /memfd:lavapipe (deleted)
7f3a30000000-7f3a30010000 r--p 00000000 fe:01 4242          /opt/my libs/libgpu.so
7f3a30010000-7f3a30020000 ---p 00010000 fe:01 4242          /opt/my libs/libgpu.so
7f3a40000000-7f3a40001000 r--p 00000000 fe:01 999           /tmp/old.so (deleted)
7f3a50000000-7f3a50001000 rw-s 00000000 00:01 5            /SYSV00000000 (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0             [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0     [vsyscall]
";

    #[test]
    fn only_readable_regular_files_are_listed() {
        let found: Vec<FileMapping<'_>> = file_mappings(MAPS).collect();
        assert_eq!(
            found,
            [
                FileMapping {
                    start: 0x55d0c0a00000,
                    end: 0x55d0c0a0a000,
                    path: "/usr/sbin/nbdkit"
                },
                FileMapping {
                    start: 0x55d0c0a0a000,
                    end: 0x55d0c0a1e000,
                    path: "/usr/sbin/nbdkit"
                },
                FileMapping {
                    start: 0x7f3a30000000,
                    end: 0x7f3a30010000,
                    path: "/opt/my libs/libgpu.so"
                },
            ]
        );
        assert_eq!(found[2].len(), 0x10000);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        for line in [
            "",
            "xyz",
            "zz-10 r--p 0 0 0 /a",
            "10-20 r--p",
            "10 r--p 0 0:0 1 /a",
            "20-10 r--p 0 0:0 1 /a",
        ] {
            assert_eq!(file_mappings(line).count(), 0, "{line:?}");
        }
    }

    #[test]
    fn this_process_maps_its_own_executable() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap();
        assert!(
            file_mappings(&maps).any(|m| m.path == exe && !m.is_empty()),
            "{exe} not among\n{maps}"
        );
    }
}
