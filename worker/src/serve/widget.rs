//! The reference widget's static files, and who may frame them (CSP frame-ancestors).

use super::*;

/// The widget may be framed by this service's pages and the configured workstation origins:
/// each one exact (scheme, host, optional port), never a wildcard — `https://*` would let any
/// site frame a doctor's widget (clickjacking), so it is refused at start.
pub(super) fn frame_ancestors(origins: &[String]) -> Result<String, WorkerError> {
    let mut policy = String::from("'self'");
    for origin in origins {
        let exact = url::Url::parse(origin).ok().is_some_and(|u| {
            matches!(u.scheme(), "https" | "http")
                && u.host_str().is_some_and(|h| !h.is_empty())
                && u.username().is_empty()
                && u.password().is_none()
                && u.path() == "/"
                && u.query().is_none()
                && u.fragment().is_none()
        });
        let ok = exact && !origin.contains(['*', ' ', ';', ',', '\'', '"']);
        if !ok {
            return Err(WorkerError::Config(format!(
                "[serve] embed_origins: {origin:?} is not an origin like https://his.example"
            )));
        }
        policy.push(' ');
        policy.push_str(origin);
    }
    Ok(policy)
}

/// The widget is part of the binary: what was tested is what is served.
pub(super) fn widget_asset(file: &str) -> Option<(&'static str, &'static str)> {
    Some(match file {
        "index.html" => ("text/html; charset=utf-8", include_str!("widget/index.html")),
        "widget.js" => ("text/javascript; charset=utf-8", include_str!("widget/widget.js")),
        "widget.css" => ("text/css; charset=utf-8", include_str!("widget/widget.css")),
        _ => return None,
    })
}

/// `/widget?…` → `/widget/?…` (relative addresses in the page need the slash).
pub(super) async fn widget_root(axum::extract::RawQuery(query): axum::extract::RawQuery) -> axum::response::Redirect {
    axum::response::Redirect::permanent(&match query {
        Some(q) => format!("/widget/?{q}"),
        None => "/widget/".into(),
    })
}

pub(super) async fn widget_file(s: Arc<Service>, file: String) -> Response {
    match widget_asset(&file) {
        Some((content_type, body)) => (
            [
                (header::CONTENT_TYPE, content_type.to_string()),
                // Its own scripts and styles only, nothing but this service to talk to, and
                // framed only by the workstations configured.
                (
                    header::CONTENT_SECURITY_POLICY,
                    format!(
                        "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors {}",
                        s.frame_ancestors
                    ),
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
                (header::REFERRER_POLICY, "no-referrer".to_string()),
                (header::CACHE_CONTROL, "no-cache".to_string()),
            ],
            body,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
