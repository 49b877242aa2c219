//! Bytes through lb: exact in both directions at once, half-close passed on, many connections
//! at once. Every case runs once per dataplane.

use std::{
    io::Write as _,
    net::TcpStream,
    sync::mpsc,
    time::{Duration, Instant},
};

use lb_tests::{
    backend::Backend,
    lb::{LbConfig, ServiceSpec},
    per_dataplane,
    stream::{
        Pattern, Rng, StreamHasher, connect, half_close, raise_nofile_limit, read_exactly,
        read_to_eof, wait_until,
    },
    terminates_tcp,
};

/// Seeds of the client-to-backend and backend-to-client streams: different, so a relay that
/// crossed or looped the directions is caught.
const UP_SEED: u64 = 0x5550;
const DOWN_SEED: u64 = 0xd0d0;

/// 256 MiB each way; `LB_TEST_BULK_MIB` changes it (for a quick run while developing).
fn bulk_len() -> u64 {
    let mib = std::env::var("LB_TEST_BULK_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(256);
    mib << 20
}

per_dataplane! {
    fn bulk_transfer_both_ways_at_once_is_sha256_exact(dataplane) {
        let len = bulk_len();
        let (report, reports) = mpsc::channel();
        let backend = Backend::sink_source(len, DOWN_SEED, UP_SEED, report);
        let lb =
            LbConfig::new(dataplane, vec![ServiceSpec::new("bulk", &[backend.addr()])]).start();
        let started = Instant::now();

        let client = connect(lb.addr());
        client
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        client
            .set_write_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut writer = client.try_clone().unwrap();
        let upload = std::thread::spawn(move || {
            let mut hasher = StreamHasher::new();
            let sent = Pattern::new(UP_SEED)
                .send(&mut writer, len, &mut hasher)
                .and_then(|()| writer.shutdown(std::net::Shutdown::Write));
            (sent, hasher.finish())
        });
        let client_got = Pattern::new(DOWN_SEED).receive(&mut &client, len);
        let (sent, client_sent_sha256) = upload.join().expect("upload thread");
        let backend_saw = reports
            .recv_timeout(Duration::from_secs(60))
            .expect("the backend reports its side");
        let elapsed = started.elapsed();

        sent.expect("the client sends every byte, then its FIN");
        backend_saw
            .sent
            .as_ref()
            .expect("the backend sends every byte");
        for (who, got, expect_sha256) in [
            ("client", &client_got, &backend_saw.sent_sha256),
            ("backend", &backend_saw.received, &client_sent_sha256),
        ] {
            assert!(
                got.error.is_none(),
                "{who}'s stream ended with {:?} after {} bytes",
                got.error,
                got.bytes
            );
            assert_eq!(
                got.first_mismatch, None,
                "{who} received different bytes from offset {:?}",
                got.first_mismatch
            );
            assert_eq!(
                got.bytes, len,
                "{who} received {} bytes, want {len}",
                got.bytes
            );
            assert_eq!(
                &got.sha256, expect_sha256,
                "sha256 of what {who} received differs from what was sent"
            );
        }
        assert!(
            elapsed < Duration::from_secs(180),
            "2 x {} MiB took {elapsed:?}",
            len >> 20
        );
    }
}

per_dataplane! {
    fn a_thousand_sequential_half_close_exchanges_are_exact(dataplane) {
        let backend = Backend::reverse_after_eof();
        let lb = LbConfig::new(
            dataplane,
            vec![ServiceSpec::new("halfclose", &[backend.addr()])],
        )
        .start();
        let mut rng = Rng::new(2);
        let started = Instant::now();
        for i in 0..1000 {
            let len = rng.range(1..16 * 1024);
            let msg = rng.bytes(len);
            let mut client = connect(lb.addr());
            client
                .write_all(&msg)
                .unwrap_or_else(|e| panic!("exchange {i}: write {len} bytes: {e}"));
            half_close(&client);
            let reply = read_to_eof(&mut client, len)
                .unwrap_or_else(|e| panic!("exchange {i}: reading the reply: {e}"));
            let mut want = msg;
            want.reverse();
            assert!(
                reply == want,
                "exchange {i}: a reply of {} bytes, want the {len} bytes reversed",
                reply.len()
            );
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "1000 exchanges take over 120 s (at {i})"
            );
        }
        assert_eq!(
            backend.accepted(),
            1000,
            "one backend connection per exchange"
        );
    }
}

per_dataplane! {
    fn a_backend_half_close_leaves_the_client_direction_flowing(dataplane) {
        const GREETING: usize = 100 * 1024;
        const UPLOAD: u64 = 4 << 20;
        // The backend sends a greeting and half-closes first, then reads the client's upload to
        // EOF and reports it.
        let (report, reports) = mpsc::channel();
        let backend = Backend::spawn(move |mut s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let greeting = Pattern::new(DOWN_SEED).at(0, GREETING).to_vec();
            if s.write_all(&greeting).is_err() {
                return;
            }
            half_close(&s);
            let _ = report.send(Pattern::new(UP_SEED).receive(&mut s, UPLOAD));
        });
        let lb = LbConfig::new(
            dataplane,
            vec![ServiceSpec::new("halfback", &[backend.addr()])],
        )
        .start();
        let mut client = connect(lb.addr());
        let greeting = read_to_eof(&mut client, GREETING).expect("the greeting, then EOF");
        assert_eq!(
            Pattern::new(DOWN_SEED).check(0, &greeting),
            None,
            "the greeting differs"
        );
        assert_eq!(greeting.len(), GREETING);
        // After the backend's FIN the client's direction still carries every byte.
        let mut hasher = StreamHasher::new();
        Pattern::new(UP_SEED)
            .send(&mut client, UPLOAD, &mut hasher)
            .expect("upload after the backend's FIN");
        half_close(&client);
        let got = reports
            .recv_timeout(Duration::from_secs(20))
            .expect("the backend reports the upload");
        assert!(
            got.error.is_none(),
            "the upload ended with {:?} after {} bytes",
            got.error,
            got.bytes
        );
        assert_eq!((got.bytes, got.first_mismatch), (UPLOAD, None));
        assert_eq!(got.sha256, hasher.finish());
        let rest = read_to_eof(&mut client, 0).expect("still EOF");
        assert!(rest.is_empty());
    }
}

per_dataplane! {
    fn two_thousand_concurrent_connections_each_echo(dataplane) {
        const N: usize = 2000;
        raise_nofile_limit();
        let backend = Backend::echo();
        let lb =
            LbConfig::new(dataplane, vec![ServiceSpec::new("many", &[backend.addr()])]).start();
        let (_, base_sockets) = lb.settled_fd_counts();
        let started = Instant::now();

        // All N open at once, every request written before any reply is read.
        let mut clients: Vec<TcpStream> = (0..N).map(|_| connect(lb.addr())).collect();
        let mut rng = Rng::new(6);
        let messages: Vec<Vec<u8>> = (0..N)
            .map(|i| {
                let mut m = format!("connection {i}: ").into_bytes();
                m.extend(rng.bytes(48));
                m
            })
            .collect();
        for (i, (c, m)) in clients.iter_mut().zip(&messages).enumerate() {
            c.write_all(m)
                .unwrap_or_else(|e| panic!("connection {i}: write: {e}"));
        }
        for (i, (c, m)) in clients.iter_mut().zip(&messages).enumerate() {
            let back = read_exactly(c, m.len())
                .unwrap_or_else(|e| panic!("connection {i}: reading the echo: {e}"));
            assert!(&back == m, "connection {i}: the echo differs");
        }
        assert_eq!(
            backend.accepted(),
            N,
            "every connection reached the backend"
        );
        assert_eq!(
            backend.open(),
            N,
            "all {N} backend connections are open at once"
        );
        if terminates_tcp(dataplane) {
            let peak = lb.socket_count();
            assert!(
                peak >= base_sockets + 2 * N,
                "lb holds {peak} sockets with {N} connections open (baseline {base_sockets})"
            );
        }

        drop(clients);
        let released = wait_until(Duration::from_secs(20), || {
            lb.socket_count() <= base_sockets
        });
        assert!(
            released,
            "lb still holds {} sockets 20 s after every client closed (baseline {base_sockets})",
            lb.socket_count()
        );
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "took {:?}",
            started.elapsed()
        );
    }
}
