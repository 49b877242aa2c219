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
