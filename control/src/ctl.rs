//! `servicegate ctl`: a small blocking HTTP/1.1 client of the admin API that prints
//! aligned tables (`services`, `conntrack`) or a step-by-step explanation (`trace`), or
//! the raw JSON with `--json`. No HTTP library: one GET per command over a `TcpStream`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

/// What `ctl` asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtlCommand {
    /// Every served frontend with its backends.
    Services,
    /// Conntrack entries, optionally of one service (`ns/name` or `ns/name:port`).
    Conntrack {
        limit: Option<usize>,
        service: Option<String>,
    },
    /// What the gateway would do with a flow (`tcp 10.0.0.5:41000 -> 10.96.0.10:80`).
    Trace { flow: String },
    /// The prefixes this gateway asks its BGP speaker to announce, and why.
    Announcements,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// One `GET` against the admin API: (status, body).
pub fn get(admin: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let unreachable = || format!("cannot reach the admin API at {admin}: is servicegate running?");
    let addrs: Vec<_> = admin
        .to_socket_addrs()
        .with_context(|| format!("bad admin address {admin:?} (expected host:port)"))?
        .collect();
    let mut last_err = None;
    let mut stream = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let Some(mut stream) = stream else {
        return Err(match last_err {
            Some(e) => anyhow!(e).context(unreachable()),
            None => anyhow!(unreachable()),
        });
    };
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nAccept: application/json\r\nUser-Agent: servicegate-ctl\r\nConnection: close\r\n\r\n"
    )
    .with_context(unreachable)?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer of {admin}{path}"))?;
    parse_response(&raw).with_context(|| format!("bad HTTP answer from {admin}{path}"))
}

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split])?;
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            }
        }
    }
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(n) = length {
        body.truncate(n);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk header"))?;
        let size_text = std::str::from_utf8(&data[..eol])?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| anyhow!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
}

/// The path `command` asks for.
pub fn path_of(command: &CtlCommand) -> String {
    match command {
        CtlCommand::Services => "/v1/services".to_string(),
        CtlCommand::Conntrack { limit, service } => {
            let mut q = Vec::new();
            if let Some(l) = limit {
                q.push(format!("limit={l}"));
            }
            if let Some(s) = service {
                q.push(format!("service={}", url_encode(s)));
            }
            if q.is_empty() {
                "/v1/conntrack".to_string()
            } else {
                format!("/v1/conntrack?{}", q.join("&"))
            }
        }
        CtlCommand::Trace { flow } => format!("/v1/trace?flow={}", url_encode(flow)),
        CtlCommand::Announcements => "/v1/announcements".to_string(),
    }
}

/// Runs one `ctl` command against the admin API at `admin` and prints the answer.
pub fn run(admin: &str, command: CtlCommand, json: bool) -> anyhow::Result<()> {
    let text = render(admin, &command, json)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// What `run` prints, as a string (for tests and embedding).
pub fn render(admin: &str, command: &CtlCommand, json: bool) -> anyhow::Result<String> {
    let path = path_of(command);
    let (status, body) = get(admin, &path)?;
    let value: Option<Value> = serde_json::from_str(&body).ok();
    if status != 200 {
        let reason = value
            .as_ref()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string());
        bail!("the admin API answered {status}: {reason}");
    }
    let value = value.ok_or_else(|| anyhow!("the admin API did not answer JSON for {path}"))?;
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&value)?));
    }
    Ok(match command {
        CtlCommand::Services => services_text(&value),
        CtlCommand::Conntrack { .. } => conntrack_text(&value),
        CtlCommand::Trace { .. } => trace_text(&value),
        CtlCommand::Announcements => announcements_text(&value),
    })
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn announcements_text(v: &Value) -> String {
    let readiness = &v["readiness"];
    let mut out = String::new();
    if readiness["ready"] == true {
        out.push_str("readiness: ready\n");
    } else {
        let reasons: Vec<String> = readiness["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        out.push_str(&format!("readiness: not ready: {}\n", reasons.join("; ")));
    }
    if v["enabled"] != true {
        out.push_str("announcements: disabled (announce.enabled is false)\n");
        return out;
    }
    let netns = match v["netns"].as_str() {
        Some(ns) => format!(" in netns {ns}"),
        None => String::new(),
    };
    out.push_str(&format!(
        "announcements: table {} dev {}{netns}, proto {}\n",
        s(&v["table"]),
        s(&v["device"]),
        crate::announce::ROUTE_PROTOCOL
    ));
    if let Some(error) = v["error"].as_str() {
        out.push_str(&format!("last error: {error}\n"));
    }
    let rows: Vec<Vec<String>> = v["candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let services: Vec<String> = c["services"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            vec![
                s(&c["prefix"]),
                if c["announce"] == true { "yes" } else { "no" }.to_string(),
                if c["in_table"] == true { "yes" } else { "no" }.to_string(),
                s(&c["source"]),
                if services.is_empty() {
                    "-".to_string()
                } else {
                    services.join(",")
                },
                s(&c["reason"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str(
            "(no candidate prefixes: no LoadBalancer ingress IP, externalIP or extra prefix)\n",
        );
    } else {
        out.push_str(&table(
            &[
                "PREFIX", "ANNOUNCE", "IN TABLE", "SOURCE", "SERVICES", "WHY",
            ],
            &rows,
        ));
    }
    out
}

fn services_text(v: &Value) -> String {
    let mut rows = Vec::new();
    for f in v["frontends"].as_array().into_iter().flatten() {
        let address = if f["kind"] == "NodePort" {
            format!("*:{}", s(&f["port"]))
        } else {
            format!("{}:{}", s(&f["address"]), s(&f["port"]))
        };
        let backends: Vec<String> = f["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                let mut t = format!("{}:{}", s(&b["address"]), s(&b["port"]));
                if b["state"] != "ready" {
                    t.push_str(&format!("({})", s(&b["state"])));
                }
                if b["usable"] == false && b["state"] == "ready" {
                    t.push_str("(unusable)");
                }
                t
            })
            .collect();
        let mut flags = Vec::new();
        if f["masquerade"] == true {
            flags.push("snat".to_string());
        } else {
            flags.push("keep-src".to_string());
        }
        if let Some(t) = f["affinity"]["timeout_seconds"].as_u64() {
            flags.push(format!("affinity={t}s"));
        }
        let ranges: Vec<String> = f["source_ranges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        if !ranges.is_empty() {
            flags.push(format!("src={}", ranges.join(",")));
        }
        if f["internal_traffic_policy"].is_object() {
            flags.push("itp=Local".to_string());
        }
        rows.push(vec![
            s(&f["service"]),
            s(&f["port_name"]),
            s(&f["kind"]),
            s(&f["protocol"]),
            address,
            format!(
                "{}/{}",
                s(&f["usable_backends"]),
                f["backends"].as_array().map_or(0, Vec::len)
            ),
            flags.join(" "),
            if backends.is_empty() {
                "-".to_string()
            } else {
                backends.join(" ")
            },
        ]);
    }
    let mut out = table(
        &[
            "SERVICE", "PORT", "KIND", "PROTO", "FRONTEND", "USABLE", "FLAGS", "BACKENDS",
        ],
        &rows,
    );
    out.push_str(&format!(
        "{} frontends, snapshot generation {}, source {}{}\n",
        rows.len(),
        s(&v["generation"]),
        s(&v["source"]),
        if v["ready"] == true {
            ""
        } else {
            " (NOT READY)"
        }
    ));
    for w in v["warnings"].as_array().into_iter().flatten() {
        out.push_str(&format!("warning: {}\n", s(w)));
    }
    out
}

fn conntrack_text(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["worker"]),
                s(&e["original"]),
                s(&e["backend"]),
                s(&e["snat"]),
                s(&e["service"]),
                s(&e["state"]),
                e["expires_in_ms"]
                    .as_u64()
                    .map(crate::admin::human_ms)
                    .unwrap_or_else(|| "-".to_string()),
                format!("{}/{}", s(&e["packets_original"]), s(&e["packets_reply"])),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "WORKER",
            "FLOW",
            "BACKEND",
            "SNAT",
            "SERVICE",
            "STATE",
            "EXPIRES",
            "PKTS(O/R)",
        ],
        &rows,
    );
    out.push_str(&format!(
        "{} entries{}\n",
        rows.len(),
        if v["truncated"] == true {
            " (limit reached)"
        } else {
            ""
        }
    ));
    for m in v["incomplete"].as_array().into_iter().flatten() {
        out.push_str(&format!("incomplete: {}\n", s(m)));
    }
    out
}

/// The egress port and next hop of a trace, in one line; `None` when the trace has no
/// egress (the flow is dropped or rejected before routing).
fn egress_line(e: &Value) -> Option<String> {
    if e.is_null() {
        return None;
    }
    let Some(port) = e["port"].as_str() else {
        return Some(format!("none: {}", s(&e["detail"])));
    };
    let how = if e["via"] == "vxlan" {
        format!(
            "VXLAN VNI {} to VTEP {}{}",
            s(&e["vni"]),
            s(&e["vtep"]),
            e["node"]
                .as_str()
                .map(|n| format!(" on node {n}"))
                .unwrap_or_default()
        )
    } else {
        format!("route {}", s(&e["route"]))
    };
    Some(format!(
        "port {port}, next hop {} ({how})",
        s(&e["next_hop"])
    ))
}

fn trace_text(v: &Value) -> String {
    let mut out = format!("flow     {}\n", s(&v["flow"]));
    out.push_str(&format!("verdict  {}", s(&v["verdict"]).to_uppercase()));
    if let Some(reason) = v["drop_reason"].as_str() {
        out.push_str(&format!(" ({reason})"));
    }
    out.push('\n');
    if !v["service"].is_null() {
        out.push_str(&format!("service  {}\n", s(&v["service"])));
    }
    if let Some(to) = v["translation"]["to"].as_str() {
        out.push_str(&format!("rewrite  {to}\n"));
    }
    if let Some(line) = egress_line(&v["egress"]) {
        out.push_str(&format!("egress   {line}\n"));
    }
    out.push('\n');
    let steps = v["steps"].as_array().cloned().unwrap_or_default();
    let width = steps
        .iter()
        .map(|st| st["rule"].as_str().map_or(0, str::len))
        .max()
        .unwrap_or(0);
    for (i, st) in steps.iter().enumerate() {
        out.push_str(&format!(
            "{:>2}. {:<width$}  [{}] {}\n",
            i + 1,
            s(&st["rule"]),
            s(&st["decision"]),
            s(&st["detail"]),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_flow() {
        assert_eq!(
            url_encode("tcp 10.0.0.5:41000 -> 10.96.0.10:80"),
            "tcp%2010.0.0.5%3A41000%20-%3E%2010.96.0.10%3A80"
        );
    }

    #[test]
    fn parses_chunked() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), (200, "abcde".to_string()));
        let raw = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\nno";
        assert_eq!(parse_response(raw).unwrap(), (503, "no".to_string()));
    }

    #[test]
    fn aligns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
