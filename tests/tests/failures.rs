//! Failures on either side: resets passed on as resets, a backend that dies, refused backends
//! retried. Every case runs once per dataplane.

use std::{
    io::Write as _,
    sync::mpsc,
    time::{Duration, Instant},
};

use lb_tests::{
    backend::{Backend, KillableBackend},
    lb::{LbConfig, ServiceSpec, free_addr},
    per_dataplane,
    stream::{
        End, connect, drain_until_end, echo_round_trip, read_exactly, reset_on_close, try_connect,
        wait_until,
    },
};

per_dataplane! {
    fn a_backend_reset_mid_stream_reaches_the_client_as_a_reset(dataplane) {
        // The backend reads 2 bytes, sends 1 MiB, then resets.
        let backend = Backend::reset_mid_stream(2, 1 << 20, Duration::from_millis(100));
        let lb = LbConfig::new(dataplane, vec![ServiceSpec::new("rst", &[backend.addr()])]).start();
        for round in 0..3 {
            let mut client = connect(lb.addr());
            client.write_all(b"go").unwrap();
            let started = Instant::now();
            let (end, bytes) = drain_until_end(&mut client, Duration::from_secs(5));
            assert_eq!(
                end,
                End::Reset,
                "round {round}: after {bytes} bytes the client saw {end:?}, want a reset (ECONNRESET), not a clean EOF"
            );
            assert!(
                bytes <= 1 << 20,
                "round {round}: {bytes} bytes, more than the backend sent"
            );
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }
}

per_dataplane! {
    fn a_backend_reset_while_the_client_sends_reaches_the_client_as_a_reset(dataplane) {
        // The backend reads 2 bytes and resets at once, while the client keeps sending.
        let backend = Backend::reset_mid_stream(2, 0, Duration::ZERO);
        let lb = LbConfig::new(dataplane, vec![ServiceSpec::new("rst", &[backend.addr()])]).start();
        for round in 0..3 {
            let client = connect(lb.addr());
            let first = first_end_while_sending(&client, Duration::from_secs(10));
            assert_eq!(
                first,
                End::Reset,
                "round {round}: the client saw {first:?} first, want a reset"
            );
        }
    }
}

/// Sends without pause and reads what comes, from one thread on a non-blocking socket, until
/// the first sign of the end: a read of EOF, or a reset on either a read or a write. (Two
/// threads would not do: the first call to meet a reset consumes it, and the other then sees a
/// plain EOF.)
fn first_end_while_sending(client: &std::net::TcpStream, timeout: Duration) -> End {
    use std::io::{ErrorKind, Read as _};
    client.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut buf = vec![0u8; 64 * 1024];
    let started = Instant::now();
    while started.elapsed() < timeout {
        let mut idle = true;
        match (&*client).read(&mut buf) {
            Ok(0) => return End::Eof,
            Ok(_) => idle = false,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return lb_tests::stream::end_of(&e),
        }
        match (&*client).write(&chunk) {
            Ok(_) => idle = false,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return lb_tests::stream::end_of(&e),
        }
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    End::Timeout
}

per_dataplane! {
    fn a_client_reset_reaches_the_backend_as_a_reset(dataplane) {
        let (report, ends) = mpsc::channel();
        let backend = Backend::report_end(report);
        let lb = LbConfig::new(dataplane, vec![ServiceSpec::new("rst", &[backend.addr()])]).start();
        let mut client = connect(lb.addr());
        client.write_all(b"hello").unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || backend.accepted() == 1),
            "lb never connected to the backend"
        );
        reset_on_close(&client);
        drop(client);
        let end = ends
            .recv_timeout(Duration::from_secs(10))
            .expect("the backend reports how its stream ended");
        assert_eq!(end, End::Reset, "the backend saw {end:?}, want a reset");
    }
}

per_dataplane! {
    fn a_killed_backend_ends_the_client_stream_and_leaks_no_fd(dataplane) {
        let mut process = KillableBackend::spawn();
        let mut thread_backend = None;
        let backend_addr = match &process {
            Some(p) => p.addr(),
            None => {
                eprintln!(
                    "python3 not found: the killed backend is a thread closing with resets instead of a process"
                );
                let b = Backend::endless_source();
                let addr = b.addr();
                thread_backend = Some(b);
                addr
            }
        };
        let lb = LbConfig::new(dataplane, vec![ServiceSpec::new("kill", &[backend_addr])]).start();
        let (base_fds, base_sockets) = lb.settled_fd_counts();

        let mut client = connect(lb.addr());
        client.write_all(&[1u8; 64 * 1024]).unwrap();
        read_exactly(&mut client, 1 << 20).expect("1 MiB from the backend before it dies");

        match (&mut process, &mut thread_backend) {
            (Some(p), _) => p.kill(),
            (None, Some(b)) => b.abort(),
            (None, None) => unreachable!(),
        }
        let killed = Instant::now();
        // Drains what was in flight; each read may wait at most 2 s.
        let (end, _) = drain_until_end(&mut client, Duration::from_secs(2));
        let took = killed.elapsed();
        assert!(
            matches!(end, End::Eof | End::Reset),
            "after the backend died, the client saw {end:?}, want EOF or reset"
        );
        assert!(
            took < Duration::from_secs(2),
            "the client saw the end {took:?} after the backend died"
        );
        drop(client);

        // Every socket of that connection closed; pipes beyond the pool's are too. The pool
        // may keep the (at most two) pipes the connection used: 4 fds.
        let clean = wait_until(Duration::from_secs(5), || {
            lb.socket_count() == base_sockets && lb.fd_count() <= base_fds + 4
        });
        assert!(
            clean,
            "5 s after the connection ended lb has {} fds ({} sockets), baseline {base_fds} ({base_sockets} sockets):\n{:?}",
            lb.fd_count(),
            lb.socket_count(),
            lb.fds()
        );
    }
}

per_dataplane! {
    fn refused_backends_are_retried_and_every_client_is_served(dataplane) {
        let good = Backend::echo();
        // Nothing listens on these: connects are refused.
        let (refused_a, refused_b) = (free_addr(), free_addr());
        let lb = LbConfig::new(
            dataplane,
            vec![ServiceSpec::new("retry", &[refused_a, good.addr(), refused_b]).retries(2)],
        )
        .start();
        let started = Instant::now();
        for i in 0..200 {
            let mut client = connect(lb.addr());
            let msg = format!("client {i}");
            echo_round_trip(&mut client, msg.as_bytes())
                .unwrap_or_else(|e| panic!("client {i} was not served: {e}"));
        }
        assert_eq!(good.accepted(), 200);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "200 clients took {:?}",
            started.elapsed()
        );
    }
}

per_dataplane! {
    fn no_reachable_backend_resets_the_client_and_lb_keeps_serving(dataplane) {
        let lb = LbConfig::new(
            dataplane,
            vec![ServiceSpec::new("none", &[free_addr(), free_addr()]).retries(2)],
        )
        .start();
        for round in 0..3 {
            // The reset may come before the connect call returns; it then reports it.
            let end = match try_connect(lb.addr()) {
                Ok(mut client) => drain_until_end(&mut client, Duration::from_secs(5)).0,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => End::Reset,
                Err(e) => panic!("round {round}: connect: {e}"),
            };
            assert_eq!(
                end,
                End::Reset,
                "round {round}: with no backend reachable the client saw {end:?}"
            );
        }
    }
}
