//! The PROXY protocol header (v1 text, v2 binary) a backend receives before any client byte.
//! Runs once per dataplane.

use std::{io::Read as _, io::Write as _, net::SocketAddr, time::Duration};

use lb_tests::{
    backend::Backend,
    lb::{LbConfig, ServiceSpec},
    per_dataplane,
    stream::{connect, half_close, read_exactly, read_to_eof},
};

per_dataplane! {
    fn the_backend_sees_the_client_address_in_a_v1_and_a_v2_header(dataplane) {
        let backend = Backend::proxy_header_echo();
        let lb = LbConfig::new(
            dataplane,
            vec![
                ServiceSpec::new("ppv1", &[backend.addr()]).proxy_protocol("v1"),
                ServiceSpec::new("ppv2", &[backend.addr()]).proxy_protocol("v2"),
            ],
        )
        .start();
        for (version, listen) in [("v1", lb.addrs()[0]), ("v2", lb.addrs()[1])] {
            for i in 0..10 {
                let mut client = connect(listen);
                // Client bytes right away: the header must still come first.
                let payload = format!("payload {version} {i}");
                client.write_all(payload.as_bytes()).unwrap();
                let line =
                    read_line(&mut client).unwrap_or_else(|e| panic!("{version} client {i}: {e}"));
                let want = format!("{version} {} {}", client.local_addr().unwrap(), listen);
                assert_eq!(
                    line, want,
                    "{version} client {i}: what the backend saw (want `VERSION SOURCE DESTINATION`)"
                );
                let back = read_exactly(&mut client, payload.len())
                    .expect("the payload echoed after the header");
                assert_eq!(
                    back,
                    payload.as_bytes(),
                    "{version} client {i}: the payload after the header"
                );
                half_close(&client);
                let rest = read_to_eof(&mut client, 0).expect("EOF after the echo");
                assert!(rest.is_empty());
            }
        }
    }
}

/// One line (without the newline), at most 200 bytes.
fn read_line(stream: &mut std::net::TcpStream) -> Result<String, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 200 {
        match stream.read(&mut byte) {
            Ok(0) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(&line))),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&line))),
        }
    }
    Err(format!(
        "no newline in {:?}",
        String::from_utf8_lossy(&line)
    ))
}

#[test]
fn the_header_parser_reads_the_specification_examples() {
    // The parser the backend uses, checked against the specification's examples, so a failure
    // above is lb's and not the test's.
    let v1 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET";
    let mut r = &v1[..];
    let h = lb_tests::backend::read_proxy_header(&mut r).unwrap();
    assert_eq!(h.version, "v1");
    assert_eq!(h.source, "192.168.0.1:56324".parse::<SocketAddr>().unwrap());
    assert_eq!(
        h.destination,
        "192.168.0.11:443".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(r, b"GET", "nothing past the header is consumed");

    let mut v2 = lb_tests::backend::PROXY_V2_SIGNATURE.to_vec();
    v2.extend_from_slice(&[
        0x21, 0x11, 0x00, 0x0c, 10, 0, 0, 1, 10, 0, 0, 2, 0x04, 0xd2, 0x00, 0x50,
    ]);
    v2.extend_from_slice(b"x");
    let mut r = &v2[..];
    let h = lb_tests::backend::read_proxy_header(&mut r).unwrap();
    assert_eq!(h.version, "v2");
    assert_eq!(h.source, "10.0.0.1:1234".parse::<SocketAddr>().unwrap());
    assert_eq!(h.destination, "10.0.0.2:80".parse::<SocketAddr>().unwrap());
    assert_eq!(r, b"x");
}
