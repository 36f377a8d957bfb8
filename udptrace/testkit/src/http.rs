//! Plain HTTP GETs to the servers the tests and the bench start on 127.0.0.1, and reading
//! a Prometheus text page.

/// GET `url`: the body, or what went wrong.
pub fn get(url: &str) -> Result<String, String> {
    ureq::get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: {e}"))
}

/// POST `url` with no body: the status and the body, whatever the status.
pub fn post(url: &str) -> Result<(u16, String), String> {
    let mut response = ureq::post(url)
        .config()
        .http_status_as_error(false)
        .build()
        .send_empty()
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("POST {url}: {e}"))?;
    Ok((status, body))
}

/// GET `url`: the body; panics saying why when it fails.
pub fn http_get(url: &str) -> String {
    get(url).unwrap_or_else(|e| panic!("{e}"))
}

/// The value of the first sample in a Prometheus text page whose line starts with
/// `series` (a metric name, or a name with labels: `udptrace_drops_total{reason="NO_SOCKET"`).
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(series).is_some_and(|rest| {
                rest.starts_with([' ', '{', ',', '}'])
                    || series.ends_with(['{', ',', '"', '}', ' '])
            })
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_sample_by_name_or_labels() {
        let page = "# HELP udptrace_flows Flows tracked now\n\
                    # TYPE udptrace_flows gauge\n\
                    udptrace_flows 3\n\
                    udptrace_flows_expired_total 9\n\
                    udptrace_drops_total{netns=\"1\",reason=\"NO_SOCKET\"} 2\n";
        assert_eq!(metric_value(page, "udptrace_flows"), Some(3.0));
        assert_eq!(
            metric_value(page, "udptrace_flows_expired_total"),
            Some(9.0)
        );
        assert_eq!(
            metric_value(page, "udptrace_drops_total{netns=\"1\""),
            Some(2.0)
        );
        assert_eq!(metric_value(page, "udptrace_drops"), None);
    }
}
