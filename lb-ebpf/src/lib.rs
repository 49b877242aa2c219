//! Empty on purpose: the programs are in the `lb-xdp` binary (src/main.rs). This library only
//! exists so `lb-userspace` can name `lb-ebpf` as a build-dependency and be rebuilt when it
//! changes.
#![no_std]
