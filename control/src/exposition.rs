//! Which exposition format `/metrics` answers in, and the classic Prometheus text format
//! (0.0.4) derived from the OpenMetrics text that `prometheus_client` encodes.
//!
//! Prometheus 2.x asks for OpenMetrics first
//! (`application/openmetrics-text;version=1.0.0,…,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`)
//! and gets it. A client that prefers `text/plain` (older Prometheus, `promtool`, most
//! agents), or says nothing (`curl` without `-H Accept`, `*/*`), gets the classic format, as
//! the Go client library does: it is the one every scraper and `promtool check metrics`
//! read.

/// An exposition format `/metrics` can answer in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Text,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The format an `Accept` header asks for: the supported media range with the highest
/// quality (OpenMetrics on a tie, as the Go client library chooses); the classic text
/// format when the header is absent, names neither or only wildcards.
pub fn negotiate(accept: Option<&str>) -> Format {
    let mut best: Option<(f32, Format)> = None;
    for range in accept.unwrap_or("").split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let mut quality = 1.0f32;
        let mut version = None;
        for param in parts {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            match key.trim().to_ascii_lowercase().as_str() {
                "q" => quality = value.parse().unwrap_or(0.0),
                "version" => version = Some(value.to_string()),
                _ => {}
            }
        }
        let format = match (media.as_str(), version.as_deref()) {
            ("application/openmetrics-text", None | Some("1.0.0") | Some("0.0.1")) => {
                Format::OpenMetrics
            }
            ("text/plain", None | Some("0.0.4")) => Format::Text,
            _ => continue,
        };
        if quality <= 0.0 {
            continue;
        }
        let better = match best {
            None => true,
            Some((q, f)) => quality > q || (quality == q && f == Format::Text && format != f),
        };
        if better {
            best = Some((quality, format));
        }
    }
    best.map_or(Format::Text, |(_, format)| format)
}

/// What a metric family is, from its `# TYPE` line.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Info,
    Other,
}

/// Rewrites OpenMetrics text (as `prometheus_client` encodes it) into the classic text
/// format: a counter's HELP and TYPE name its `_total` series and its `_created` sample is
/// left out; an info family becomes a gauge named `_info`; `unknown` is `untyped`; `# UNIT`
/// and `# EOF` go (0.0.4 has neither). Samples, labels and values are written alike in both.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut kind = Kind::Other;
    let mut family = "";
    let mut pending_help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Written after TYPE, once the family's kind is known.
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, help));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, openmetrics_type) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            family = name;
            let (exposed, text_type) = match openmetrics_type {
                "counter" => {
                    kind = Kind::Counter;
                    (format!("{name}_total"), "counter")
                }
                "info" => {
                    kind = Kind::Info;
                    (format!("{name}_info"), "gauge")
                }
                "gauge" | "histogram" | "summary" => {
                    kind = Kind::Other;
                    (name.to_string(), openmetrics_type)
                }
                _ => {
                    kind = Kind::Other;
                    (name.to_string(), "untyped")
                }
            };
            if let Some((help_name, help)) = pending_help.take() {
                if help_name == name {
                    out.push_str("# HELP ");
                    out.push_str(&exposed);
                    out.push(' ');
                    out.push_str(help);
                    out.push('\n');
                }
            }
            out.push_str("# TYPE ");
            out.push_str(&exposed);
            out.push(' ');
            out.push_str(text_type);
            out.push('\n');
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            // `# UNIT`, `# EOF`: nothing of the kind in 0.0.4.
            continue;
        }
        if kind == Kind::Counter {
            let sample = line.find(['{', ' ']).map_or(line, |end| &line[..end]);
            if sample.strip_prefix(family) == Some("_created") {
                continue;
            }
        }
        // An exemplar (` # {…} v`) is OpenMetrics only.
        let sample = match line.find(" # ") {
            Some(at) if !inside_label_value(line, at) => &line[..at],
            _ => line,
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// Whether byte `at` of a sample line lies inside a quoted label value.
fn inside_label_value(line: &str, at: usize) -> bool {
    let mut quoted = false;
    let mut escaped = false;
    for &b in &line.as_bytes()[..at] {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => quoted = !quoted,
            _ => {}
        }
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMETHEUS_2: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn negotiation_follows_the_clients_preference() {
        assert_eq!(negotiate(Some(PROMETHEUS_2)), Format::OpenMetrics);
        assert_eq!(
            negotiate(Some(
                "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5"
            )),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text; version=0.0.1")),
            Format::OpenMetrics
        );
        assert_eq!(negotiate(Some("text/plain")), Format::Text);
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(negotiate(Some("application/json")), Format::Text);
        // An unknown version is not what we write; q=0 refuses.
        assert_eq!(
            negotiate(Some("application/openmetrics-text;version=2.0.0")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0, text/plain;q=0.1")),
            Format::Text
        );
        // A tie goes to OpenMetrics, whichever comes first.
        assert_eq!(
            negotiate(Some(
                "text/plain;version=0.0.4, application/openmetrics-text"
            )),
            Format::OpenMetrics
        );
    }

    #[test]
    fn openmetrics_becomes_classic_text() {
        let openmetrics = "\
# HELP sg_drops Frames dropped.
# TYPE sg_drops counter
sg_drops_total{reason=\"a # b\"} 4
sg_drops_created 1.7e9
# HELP sg_build Build.
# TYPE sg_build info
sg_build_info{version=\"1\"} 1
# HELP sg_latency_seconds Latency.
# TYPE sg_latency_seconds histogram
# UNIT sg_latency_seconds seconds
sg_latency_seconds_sum 0.5
sg_latency_seconds_count 2
sg_latency_seconds_bucket{le=\"+Inf\"} 2
# HELP sg_odd Odd.
# TYPE sg_odd unknown
sg_odd 1 # {trace=\"x\"} 1
# EOF
";
        assert_eq!(
            openmetrics_to_text(openmetrics),
            "\
# HELP sg_drops_total Frames dropped.
# TYPE sg_drops_total counter
sg_drops_total{reason=\"a # b\"} 4
# HELP sg_build_info Build.
# TYPE sg_build_info gauge
sg_build_info{version=\"1\"} 1
# HELP sg_latency_seconds Latency.
# TYPE sg_latency_seconds histogram
sg_latency_seconds_sum 0.5
sg_latency_seconds_count 2
sg_latency_seconds_bucket{le=\"+Inf\"} 2
# HELP sg_odd Odd.
# TYPE sg_odd untyped
sg_odd 1
"
        );
    }
}
