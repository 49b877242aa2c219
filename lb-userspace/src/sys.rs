//! The few raw syscalls lb makes, in one place: pipes, splice, socket options, limits.
//!
//! Everything goes through `nix` or `socket2`, whose wrappers are safe; this module keeps the
//! flags and the error conventions in one spot so the relay reads as data flow.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::atomic::{AtomicI32, Ordering::Relaxed},
};

use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    sys::resource::{Resource, getrlimit, setrlimit},
};

/// A non-blocking, close-on-exec pipe: (read end, write end), with its capacity set to `size`
/// bytes where the kernel allows it (unprivileged users past `pipe-user-pages-soft` get less).
pub fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) =
        nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    if let Ok(size) = i32::try_from(size) {
        // Best effort: the default (64 KiB) works too, only slower for bulk transfers.
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(size));
    }
    Ok((r, w))
}

/// One non-blocking splice(2) of up to `len` bytes from `from` to `to`. Never uses
/// `SPLICE_F_MORE`: it corks small messages (measured here: 100 ms stalls).
/// Returns 0 at end of stream on a socket; `WouldBlock` when nothing can move now.
pub fn splice_once(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
    )
    .map_err(io::Error::from)
}

/// Raises the soft open-files limit to the hard limit: a proxy needs two sockets per
/// connection plus pipes in flight. Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard)
}

/// The soft open-files limit (1024 if it cannot be read).
pub fn nofile_limit() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// The data path holds no descriptor numbered at or above this: see [`reserve_descriptors`].
static DATA_PATH_CEILING: AtomicI32 = AtomicI32::new(i32::MAX);

/// Keeps the top of the open-files limit (`limit`) for the control plane: the admin API,
/// health checks, reloads. Returns how many descriptors are kept back: a quarter of the
/// limit, at most 128.
///
/// The kernel gives every new descriptor the lowest free number, so a data-path socket or
/// pipe numbered at or above `limit - reserve` proves that every number below it is taken.
/// The data path gives such a descriptor back at once (see [`data_path_fd`]), so its own
/// descriptors all lie below the line and the ones above it stay free for the control plane:
/// however many clients hold connections, `/status` and the health checks find a descriptor.
/// Without the line, whether the admin listener or the data path met EMFILE first depended
/// on the parity of the descriptors open at the time.
pub fn reserve_descriptors(limit: u64) -> u64 {
    let reserve = (limit / 4).min(128);
    let ceiling = i32::try_from(limit - reserve).unwrap_or(i32::MAX);
    DATA_PATH_CEILING.store(ceiling, Relaxed);
    reserve
}

/// `Err(EMFILE)` when the data path may not keep `fd`: it lies in the control plane's
/// reserve (see [`reserve_descriptors`]). The caller closes it and handles the error as it
/// would a real EMFILE: lb's own shortage.
pub fn data_path_fd(fd: &impl AsRawFd) -> io::Result<()> {
    if fd.as_raw_fd() >= DATA_PATH_CEILING.load(Relaxed) {
        Err(io::Error::from(Errno::EMFILE))
    } else {
        Ok(())
    }
}

/// Is this error the process or system running out of file descriptors?
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// Is this error lb's own, not the peer's: out of file descriptors or memory, or of local
/// ports (EADDRNOTAVAIL on connect: no free ephemeral port toward that address)?
pub fn is_local_error(e: &io::Error) -> bool {
    is_fd_exhaustion(e)
        || matches!(
            e.raw_os_error().map(Errno::from_raw),
            Some(Errno::EADDRNOTAVAIL | Errno::EADDRINUSE)
        )
}

/// Makes the next close of `socket` send a reset instead of a FIN (SO_LINGER 0).
pub fn reset_on_close(socket: &impl AsFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO));
}

/// Drops what the daemon no longer needs once its sockets are bound (and, for eBPF dataplanes,
/// its programs loaded): switches to `run_as` if given, keeps only `keep` in the permitted,
/// effective and bounding sets, and sets no_new_privs.
///
/// Linux capabilities are per thread: call this before any other thread exists (before the
/// async runtime starts), so every thread inherits the reduced sets.
pub fn drop_privileges(run_as: Option<&str>, keep: &[caps::Capability]) -> io::Result<()> {
    use caps::{CapSet, CapsHashSet};
    let other = |e: caps::errors::CapsError| io::Error::other(e.to_string());
    let keep_set: CapsHashSet = keep.iter().copied().collect();
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            if !keep_set.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(other)?;
            }
        }
    }
    if let Some(name) = run_as {
        let user = nix::unistd::User::from_name(name)
            .map_err(io::Error::from)?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("run_as: no user named {name:?}"),
                )
            })?;
        // Keep permitted capabilities across setuid, then restore the effective ones below.
        nix::sys::prctl::set_keepcaps(true).map_err(io::Error::from)?;
        nix::unistd::setgroups(&[]).map_err(io::Error::from)?;
        nix::unistd::setgid(user.gid).map_err(io::Error::from)?;
        nix::unistd::setuid(user.uid).map_err(io::Error::from)?;
        nix::sys::prctl::set_keepcaps(false).map_err(io::Error::from)?;
    }
    let permitted = caps::read(None, CapSet::Permitted).map_err(other)?;
    let kept: CapsHashSet = permitted.intersection(&keep_set).copied().collect();
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(other)?;
    caps::set(None, CapSet::Effective, &kept).map_err(other)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(other)?;
    nix::sys::prctl::set_no_new_privs().map_err(io::Error::from)?;
    Ok(())
}

/// Bytes ever queued for sending on the TCP socket `socket` (acknowledged ones plus those
/// still in its send queue): `tcpi_bytes_acked` + SIOCOUTQ.
///
/// Read in that order, an ACK arriving in between can only make the sum smaller than the
/// truth, never larger, so "at least N bytes have been queued" is never claimed early.
pub fn tcp_bytes_queued(socket: &impl AsFd) -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let acked = tcp_info_u64(socket, TCPI_BYTES_ACKED)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(outq).unwrap_or(0))
}

/// Bytes waiting unread in the receive queue of the TCP socket `socket` (SIOCINQ; a FIN is
/// not counted).
pub fn tcp_bytes_unread(socket: &impl AsFd) -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let mut inq: libc::c_int = 0;
    // SAFETY: SIOCINQ (FIONREAD) writes one int through the pointer, valid for the call.
    let rc = unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), libc::FIONREAD, &mut inq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(inq).unwrap_or(0))
}

/// Bytes `socket` has received (`tcpi_bytes_received`): its data, plus one for a FIN.
pub fn tcp_bytes_received(socket: &impl AsFd) -> io::Result<u64> {
    tcp_info_u64(socket, TCPI_BYTES_RECEIVED)
}

/// Offsets in `struct tcp_info` (linux/tcp.h, a stable ABI).
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;

/// Whether the TCP socket `socket` is ESTABLISHED (`tcpi_state`): neither side has sent a
/// FIN yet.
pub fn tcp_established(socket: &impl AsFd) -> io::Result<bool> {
    const TCP_ESTABLISHED: u64 = 1;
    // tcpi_state is the first byte of struct tcp_info.
    Ok(tcp_info_u64(socket, 0)? & 0xff == TCP_ESTABLISHED)
}

/// The `u64` field at byte offset `at` of the socket's `struct tcp_info`.
fn tcp_info_u64(socket: &impl AsFd, at: usize) -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    // Up to and including tcpi_bytes_received.
    const LEN: usize = 136;
    let mut info = [0u8; LEN];
    let mut len = LEN as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the call, and `len`
    // is a valid socklen_t the kernel updates with the size it wrote.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < at + 8 {
        return Err(io::Error::other(format!(
            "this kernel's tcp_info is {len} bytes; the field at {at} is missing"
        )));
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&info[at..at + 8]);
    Ok(u64::from_ne_bytes(v))
}

/// The kernel's cookie of `socket` (SO_COOKIE): unique for the socket's lifetime.
pub fn socket_cookie(socket: &impl AsFd) -> io::Result<u64> {
    socket2::SockRef::from(socket).cookie()
}

/// Runs the bytes already in `socket`'s receive queue through its `sk_data_ready` hook, which
/// for a socket in a sockmap is the verdict program: setting SO_RCVLOWAT makes TCP check
/// "is there data to signal?" at once (`tcp_set_rcvlowat` calls `tcp_data_ready`).
///
/// Used instead of a read: on this kernel a read that finds bytes the program has not seen
/// yet runs the program and then rewinds `copied_seq` over what it redirected
/// (`tcp_bpf_recvmsg_parser` samples it first), which breaks the connection.
pub fn kick_receive_queue(socket: &impl AsFd) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid int for the duration of the call, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `statfs(2)`'s magic number of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` (or, if it does not exist yet, its nearest existing ancestor) is on a bpffs.
/// Returns that existing directory too.
pub fn on_bpffs(path: &std::path::Path) -> io::Result<(bool, std::path::PathBuf)> {
    let mut dir = path;
    while !dir.exists() {
        dir = dir.parent().unwrap_or(std::path::Path::new("/"));
    }
    let fs = nix::sys::statfs::statfs(dir).map_err(io::Error::from)?;
    #[expect(
        clippy::useless_conversion,
        reason = "the type of f_type differs by libc"
    )]
    let magic = i64::from(fs.filesystem_type().0);
    Ok((magic == BPF_FS_MAGIC, dir.to_owned()))
}

/// Mounts a bpffs on the directory `at` (mode 0700), as `mount -t bpf bpf AT` would.
pub fn mount_bpffs(at: &std::path::Path) -> io::Result<()> {
    nix::mount::mount(
        Some("bpf"),
        at,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(io::Error::from)
}

/// The kernel driver of network interface `interface` (`ethtool -i`: ETHTOOL_GDRVINFO), e.g.
/// `veth`, `mlx5_core`.
pub fn interface_driver(interface: &str) -> io::Result<String> {
    use std::os::fd::AsRawFd as _;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    /// `struct ethtool_drvinfo` (linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    if interface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    // SAFETY: an all-zero ifreq is valid (a name and a union of plain data).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(interface.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = std::ptr::from_mut(&mut info).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO writes at most a `struct ethtool_drvinfo`
    // through ifru_data, which points at `info` (that size, alive for the call); `req` is a
    // valid ifreq with a NUL-terminated name.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// An error and its causes on one line (`outer: cause: root cause`). A cause whose text the
/// line already holds is left out (some errors repeat their source in their own message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// A MAC address as Linux prints it (`aa:bb:cc:dd:ee:ff`, as in `/sys/class/net/*/address`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod mac_tests {
    use super::*;

    #[test]
    fn mac_addresses() {
        assert_eq!(
            parse_mac("aa:bb:cc:dd:ee:ff"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])
        );
        assert_eq!(
            parse_mac("02:42:ac:11:00:02"),
            Some([2, 0x42, 0xac, 0x11, 0, 2])
        );
        assert_eq!(parse_mac("aa:bb:cc:dd:ee"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff:00"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:gg"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:+f"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:"), None);
    }
}
