//! Pools of pipes (for splice) and buffers (for read/write) for the relay.
//!
//! A connection holds a pipe or a buffer only while bytes are in flight in one direction; an
//! idle connection holds neither. With an open-files hard limit of 20000 that is what lets 5,000
//! concurrent connections (10,000 sockets) fit. Only empty pipes go back to the pool.

use std::{io, os::fd::OwnedFd, sync::Mutex};

use crate::sys;

/// A pipe: read end and write end, both non-blocking.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

/// Idle pipes and buffers ready for reuse, at most `max_idle` of each.
#[derive(Debug)]
pub struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    buffers: Mutex<Vec<Box<[u8]>>>,
    max_idle: usize,
    pipe_size: usize,
    buffer_size: usize,
}

impl PipePool {
    pub fn new(max_idle: usize, pipe_size: usize, buffer_size: usize) -> PipePool {
        PipePool {
            idle: Mutex::new(Vec::with_capacity(max_idle)),
            buffers: Mutex::new(Vec::with_capacity(max_idle)),
            max_idle,
            pipe_size,
            buffer_size,
        }
    }

    /// The size of each buffer (what one read can move).
    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// A buffer, reused or new.
    pub fn get_buffer(&self) -> Box<[u8]> {
        let reused = self.buffers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| vec![0; self.buffer_size].into_boxed_slice())
    }

    /// Returns a buffer for reuse.
    pub fn put_buffer(&self, buffer: Box<[u8]>) {
        let mut buffers = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        if buffers.len() < self.max_idle {
            buffers.push(buffer);
        }
    }

    /// The capacity of each pipe, in bytes (what one splice can move).
    pub fn pipe_size(&self) -> usize {
        self.pipe_size
    }

    /// An empty pipe, reused or new. `Err(EMFILE)` when a new one would take descriptors
    /// from the control plane's reserve ([`sys::data_path_fd`]): the caller copies instead.
    pub fn get(&self) -> io::Result<Pipe> {
        if let Some(pipe) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(pipe);
        }
        let (read, write) = sys::pipe(self.pipe_size)?;
        // The later of the two has the higher number.
        sys::data_path_fd(&write)?;
        Ok(Pipe { read, write })
    }

    /// Returns an EMPTY pipe for reuse. A pipe that may still hold bytes must be dropped.
    pub fn put(&self, pipe: Pipe) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(pipe);
        }
    }
}
