//! `lb status`: fetches `/status` from a running lb's admin API and prints it as a table.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Fetches and prints `/status` (as JSON when `json`).
pub fn print(admin: &str, json: bool) -> anyhow::Result<()> {
    let body = get(admin, "/status")?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let status: Value = serde_json::from_str(&body).context("/status did not return JSON")?;
    print!("{}", render(&status));
    Ok(())
}

/// A plain HTTP/1.0 GET: the admin API is local and tiny, no client library needed.
fn get(admin: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(admin).with_context(|| {
        format!(
            "cannot reach the admin API at {admin}: is lb running with `admin.listen: {admin}`?"
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.take(16 << 20).read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        bail!("{path}: {status_line}");
    }
    Ok(body.to_owned())
}

/// A number for a table cell ("?" when absent), so column widths apply.
fn num(v: &Value) -> String {
    v.as_u64().map_or_else(|| "?".to_owned(), |n| n.to_string())
}

/// The table: one block per service, one row per backend.
pub fn render(status: &Value) -> String {
    let mut out = format!(
        "dataplane: {}\n",
        status["dataplane"].as_str().unwrap_or("?")
    );
    for (name, why) in status["passed_over"].as_object().into_iter().flatten() {
        out.push_str(&format!("  not {name}: {}\n", why.as_str().unwrap_or("?")));
    }
    if let Some(xdp) = status["xdp"].as_object() {
        out.push_str(&format!(
            "  xdp on {} ({})\n",
            xdp["interface"].as_str().unwrap_or("?"),
            xdp["attach"].as_str().unwrap_or("?"),
        ));
        if let Some(why) = xdp["native_refused"].as_str() {
            out.push_str(&format!("  not native: {why}\n"));
        }
    }
    for service in status["services"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\nservice {}  listen {}  algorithm {}{}\n",
            service["name"].as_str().unwrap_or("?"),
            service["listen"].as_str().unwrap_or("?"),
            service["algorithm"].as_str().unwrap_or("?"),
            service["table_digest"]
                .as_str()
                .map(|d| format!("  table {d}"))
                .unwrap_or_default(),
        ));
        out.push_str(&format!(
            "  {:<40} {:>6} {:<9} {:>8} {:>12} {:>14} {:>14}\n",
            "BACKEND", "WEIGHT", "STATE", "ACTIVE", "CONNECTIONS", "BYTES_TO_BACK", "BYTES_TO_CLNT"
        ));
        for b in service["backends"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {:<40} {:>6} {:<9} {:>8} {:>12} {:>14} {:>14}\n",
                b["address"].as_str().unwrap_or("?"),
                num(&b["weight"]),
                b["state"].as_str().unwrap_or("?"),
                num(&b["active_connections"]),
                num(&b["connections_total"]),
                num(&b["bytes_to_backend"]),
                num(&b["bytes_to_client"]),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_rows() {
        let status = serde_json::json!({
            "dataplane": "proxy",
            "services": [{"name": "web", "listen": "127.0.0.1:8080", "algorithm": "maglev", "table_digest": "ab12",
                "backends": [{"address": "127.0.0.1:9001", "weight": 3, "state": "up", "active_connections": 1,
                    "connections_total": 12, "bytes_to_backend": 100, "bytes_to_client": 2000}]}]
        });
        let table = render(&status);
        assert!(
            table.contains("service web  listen 127.0.0.1:8080  algorithm maglev  table ab12"),
            "{table}"
        );
        let row = table
            .lines()
            .find(|l| l.contains("127.0.0.1:9001"))
            .unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            ["127.0.0.1:9001", "3", "up", "1", "12", "100", "2000"]
        );
        let header = table.lines().find(|l| l.contains("BACKEND")).unwrap();
        assert_eq!(header.len(), row.len(), "columns line up:\n{header}\n{row}");
    }
}
