//! The web UI: a few static files (`crates/server/ui/`, no build step) compiled into the binary
//! and served at `/` and `/ui/*`, without an API key (they hold no data: every call the pages
//! make goes through the API with the signed-in key). The pages run under a Content Security
//! Policy that allows scripts from this server only, so nothing a model writes can run even if
//! the Markdown renderer let it through (it builds DOM nodes, never HTML strings).

use axum::extract::Path;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// (path under `/ui/`, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("index.html", HTML, include_bytes!("../ui/index.html")),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../ui/app.css"),
    ),
    ("app.js", JS, include_bytes!("../ui/app.js")),
    ("api.js", JS, include_bytes!("../ui/api.js")),
    ("chat.js", JS, include_bytes!("../ui/chat.js")),
    ("charts.js", JS, include_bytes!("../ui/charts.js")),
    ("db.js", JS, include_bytes!("../ui/db.js")),
    ("markdown.js", JS, include_bytes!("../ui/markdown.js")),
    ("rank.js", JS, include_bytes!("../ui/rank.js")),
    ("server.js", JS, include_bytes!("../ui/server.js")),
    ("tune.js", JS, include_bytes!("../ui/tune.js")),
    ("usage.js", JS, include_bytes!("../ui/usage.js")),
    (
        "vendor/preact.mjs",
        JS,
        include_bytes!("../ui/vendor/preact.mjs"),
    ),
    (
        "vendor/hooks.mjs",
        JS,
        include_bytes!("../ui/vendor/hooks.mjs"),
    ),
    ("vendor/htm.mjs", JS, include_bytes!("../ui/vendor/htm.mjs")),
];

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// Scripts, styles and API calls from this origin only; no plugins, frames or foreign images.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Whether `path` is one of the UI's public files (served without a key).
pub fn is_public(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && (path == "/" || path.strip_prefix("/ui/").is_some_and(|f| find(f).is_some()))
}

fn find(file: &str) -> Option<&'static (&'static str, &'static str, &'static [u8])> {
    ASSETS.iter().find(|(p, _, _)| *p == file)
}

fn serve(content_type: &'static str, bytes: &'static [u8]) -> Response {
    let mut r = (StatusCode::OK, bytes).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// `GET /`: the UI's page.
pub async fn index() -> Result<Response, ApiError> {
    asset(Path("index.html".to_owned())).await
}

/// `GET /ui/{*file}`.
pub async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    match find(&file) {
        Some((_, t, b)) => Ok(serve(t, b)),
        None => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::invalid(
                format!(
                    "the web UI has no file `{file}`: open the UI at `/`; its files are {}",
                    ASSETS
                        .iter()
                        .map(|(p, _, _)| *p)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None,
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_files_that_are_served() {
        let html = std::str::from_utf8(include_bytes!("../ui/index.html")).unwrap_or_default();
        for (p, _, _) in ASSETS {
            if p.ends_with(".css") || *p == "app.js" {
                assert!(html.contains(&format!("/ui/{p}")), "index.html lacks {p}");
            }
        }
        // Every module a UI file imports is in ASSETS.
        for (p, _, b) in ASSETS.iter().filter(|(p, _, _)| p.ends_with("js")) {
            let text = std::str::from_utf8(b).unwrap_or_default();
            for part in text.split("from").skip(1) {
                let part = part.trim_start();
                let Some(q) = part.chars().next().filter(|c| *c == '"' || *c == '\'') else {
                    continue;
                };
                let Some(spec) = part[1..].split(q).next() else {
                    continue;
                };
                if let Some(rel) = spec.strip_prefix("./") {
                    let dir = p.rsplit_once('/').map_or("", |(d, _)| d);
                    let full = if dir.is_empty() {
                        rel.to_owned()
                    } else {
                        format!("{dir}/{rel}")
                    };
                    assert!(
                        find(&full).is_some(),
                        "{p} imports {spec}, which is not served"
                    );
                }
            }
        }
        assert!(is_public(&Method::GET, "/ui/app.js"));
        assert!(!is_public(&Method::GET, "/ui/secret.js"));
        assert!(!is_public(&Method::POST, "/"));
    }
}
