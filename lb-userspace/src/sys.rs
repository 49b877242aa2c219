//! The few raw syscalls lb makes, in one place: pipes, splice, socket options, limits.
//!
//! Everything goes through `nix` or `socket2`, whose wrappers are safe; this module keeps the
//! flags and the error conventions in one spot so the relay reads as data flow.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
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

/// Is this error the process or system running out of file descriptors?
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
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
