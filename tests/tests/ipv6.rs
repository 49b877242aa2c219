//! IPv6: a service listening on [::1] in front of an IPv6 backend, and an IPv4 service in front
//! of an IPv6 backend: exact bytes both ways, and a PROXY header that describes the client's
//! IPv4 connection even though lb reaches the backend over IPv6.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use lb_tests::{
    backend::read_proxy_header,
    lb::{LbConfig, ServiceSpec},
    per_dataplane,
};

/// An echo backend on [::1] that first reads a PROXY header when `proxy` is set and answers
/// with the source address it carried.
fn v6_backend(proxy: bool) -> SocketAddr {
    let listener = TcpListener::bind("[::1]:0").expect("IPv6 loopback");
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut s) = stream else { continue };
            thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                if proxy {
                    let h = read_proxy_header(&mut s).expect("PROXY header");
                    let _ = writeln!(s, "{}", h.source);
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn free_v6() -> SocketAddr {
    TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap()
}

per_dataplane! {
    fn ipv6_listen_and_backend_carry_exact_bytes(dataplane) {
        let backend = v6_backend(false);
        let mut spec = ServiceSpec::new("six", &[backend]);
        spec.listen = Some(free_v6());
        let lb = LbConfig::new(dataplane, vec![spec]).start();
        let mut c = TcpStream::connect(lb.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let msg: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        c.write_all(&msg).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert!(
            back == msg,
            "bytes differ over IPv6 ({} of {} back)",
            back.len(),
            msg.len()
        );
    }
}

per_dataplane! {
    fn ipv4_service_to_ipv6_backend_sends_the_ipv4_client_in_the_proxy_header(dataplane) {
        if !lb_tests::terminates_tcp(dataplane) {
            return;
        }
        let backend = v6_backend(true);
        let lb = LbConfig::new(
            dataplane,
            vec![ServiceSpec::new("mixed", &[backend]).proxy_protocol("v2")],
        )
        .start();
        let mut c = TcpStream::connect(lb.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let local = c.local_addr().unwrap();
        let mut line = String::new();
        let mut byte = [0u8; 1];
        while !line.ends_with('\n') && c.read(&mut byte).unwrap() == 1 {
            line.push(byte[0] as char);
        }
        let seen: SocketAddr = line.trim().parse().expect("an address");
        assert_eq!(seen, local, "the PROXY source is the client as lb saw it");
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }
}
