//! A minimal HTTP/1.1 codec for sluice's own exchanges (agent <-> collector, the metrics
//! endpoint). Both ends are ours, so it supports only what they use: a request or status line,
//! headers, and a body framed by `Content-Length`. No chunked encoding, no pipelining, one
//! request per connection (`Connection: close`).
//!
//! Parsing is pure ([`check`], [`parse_request_head`], [`parse_response_head`]); the async
//! functions only move bytes. The head is bounded by [`MAX_HEAD`] bytes and the body by the
//! caller's limit (at most [`MAX_BODY`]), both checked before anything is allocated for them,
//! so a peer cannot make either end hold more than that. "Not enough bytes yet" is `Ok(None)`,
//! never an error.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request/status line plus headers.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest body either end accepts (a shipment of 4 MiB of events fits many times over).
pub const MAX_BODY: usize = 64 << 20;
const MAX_HEADERS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the HTTP head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
    #[error("the body ({declared} bytes) is larger than the {max} bytes allowed")]
    BodyTooLarge { declared: u64, max: usize },
    #[error("the connection closed {0}")]
    Truncated(&'static str),
    #[error("HTTP i/o failed")]
    Io(#[from] std::io::Error),
}

impl HttpError {
    /// The status a server answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::Malformed(_) | HttpError::Truncated(_) | HttpError::Io(_) => 400,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body,
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Response {
        let body = serde_json::json!({ "error": message }).to_string();
        Response::new(status, "application/json", body.into_bytes())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// The `error` of a JSON error body, else the body as text (for messages to people).
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

impl Request {
    pub fn post(path: &str, content_type: &str, body: Vec<u8>) -> Request {
        Request {
            method: "POST".into(),
            path: path.into(),
            headers: vec![("content-type".into(), content_type.into())],
            body,
        }
    }

    pub fn get(path: &str) -> Request {
        Request {
            method: "GET".into(),
            path: path.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The length of the head (through the blank line) when `buf` holds all of it, `None` when more
/// bytes are needed, an error when no head ends within [`MAX_HEAD`] bytes.
pub fn check(buf: &[u8]) -> Result<Option<usize>, HttpError> {
    let window = &buf[..buf.len().min(MAX_HEAD)];
    match window.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => Ok(Some(i + 4)),
        None if buf.len() >= MAX_HEAD => Err(HttpError::HeadTooLarge),
        None => Ok(None),
    }
}

/// A parsed head: the start line's three parts, the headers and the body length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub start: [String; 3],
    pub headers: Vec<(String, String)>,
    pub content_length: u64,
}

fn malformed(what: impl Into<String>) -> HttpError {
    HttpError::Malformed(what.into())
}

fn parse_head(head: &[u8]) -> Result<Head, HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| malformed("the head is not ASCII"))?;
    let text = text
        .strip_suffix("\r\n\r\n")
        .ok_or_else(|| malformed("the head does not end with an empty line"))?;
    let mut lines = text.split("\r\n");
    let start_line = lines.next().unwrap_or_default();
    let mut parts = start_line.splitn(3, ' ');
    let (Some(a), Some(b), Some(c)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(malformed(format!("bad start line {start_line:?}")));
    };
    if a.is_empty() || b.is_empty() {
        return Err(malformed(format!("bad start line {start_line:?}")));
    }
    let mut headers = Vec::new();
    let mut content_length: Option<u64> = None;
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(malformed(format!("more than {MAX_HEADERS} headers")));
        }
        if line.starts_with([' ', '\t']) {
            return Err(malformed("folded header lines are not supported"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed(format!("header line without a colon: {line:?}")))?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(malformed(format!("bad header name {name:?}")));
        }
        let name = name.to_ascii_lowercase();
        let value = value.trim().to_string();
        if name == "transfer-encoding" {
            return Err(malformed(
                "Transfer-Encoding is not supported: send the body with a Content-Length",
            ));
        }
        if name == "content-length" {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(malformed(format!("bad Content-Length {value:?}")));
            }
            let n: u64 = value
                .parse()
                .map_err(|_| malformed(format!("bad Content-Length {value:?}")))?;
            if content_length.is_some_and(|old| old != n) {
                return Err(malformed("two different Content-Length headers"));
            }
            content_length = Some(n);
        }
        headers.push((name, value));
    }
    Ok(Head {
        start: [a.to_string(), b.to_string(), c.to_string()],
        headers,
        content_length: content_length.unwrap_or(0),
    })
}

/// A request head: method, path and version `HTTP/1.x`.
pub fn parse_request_head(head: &[u8]) -> Result<Head, HttpError> {
    let h = parse_head(head)?;
    if !h.start[2].starts_with("HTTP/1.") {
        return Err(malformed(format!("unsupported version {:?}", h.start[2])));
    }
    Ok(h)
}

/// A response head: version, status code, reason.
pub fn parse_response_head(head: &[u8]) -> Result<Head, HttpError> {
    let h = parse_head(head)?;
    if !h.start[0].starts_with("HTTP/1.") {
        return Err(malformed(format!("unsupported version {:?}", h.start[0])));
    }
    if h.start[1].len() != 3 || h.start[1].parse::<u16>().is_err() {
        return Err(malformed(format!("bad status code {:?}", h.start[1])));
    }
    Ok(h)
}

/// A head read, its body not yet: what [`read_body`] needs to finish the message.
#[derive(Debug)]
pub struct PendingBody {
    declared: u64,
    /// Body bytes that arrived with the head.
    early: Vec<u8>,
}

impl PendingBody {
    /// The declared body length.
    pub fn declared(&self) -> u64 {
        self.declared
    }
}

/// Reads one head: `None` when the peer closed before sending a byte.
async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    parse: fn(&[u8]) -> Result<Head, HttpError>,
) -> Result<Option<(Head, PendingBody)>, HttpError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(n) = check(&buf)? {
            break n;
        }
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(HttpError::Truncated("in the middle of the HTTP head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = parse(&buf[..head_len])?;
    let early = buf.split_off(head_len);
    if early.len() as u64 > head.content_length {
        return Err(malformed(
            "more bytes than Content-Length (pipelining is not supported)",
        ));
    }
    let declared = head.content_length;
    Ok(Some((head, PendingBody { declared, early })))
}

/// Reads the body of a head read before, refusing more than `max_body` (at most [`MAX_BODY`])
/// from the declared length alone. Memory grows with the bytes that arrive, never ahead of
/// them, so a peer that declares much and sends little holds little.
pub async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    pending: PendingBody,
    max_body: usize,
) -> Result<Vec<u8>, HttpError> {
    let max = max_body.min(MAX_BODY);
    let declared = pending.declared;
    let len = usize::try_from(declared)
        .ok()
        .filter(|n| *n <= max)
        .ok_or(HttpError::BodyTooLarge { declared, max })?;
    let mut body = pending.early;
    body.reserve(len.saturating_sub(body.len()).min(1 << 20));
    let missing = (len - body.len()) as u64;
    let got = r.take(missing).read_to_end(&mut body).await?;
    if (got as u64) < missing {
        return Err(HttpError::Truncated("before the whole body arrived"));
    }
    Ok(body)
}

/// Reads a request's head (`None`: the client closed without sending anything); its body
/// follows with [`read_body`], once the caller knows how much it accepts from this client.
pub async fn read_request_head<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(Request, PendingBody)>, HttpError> {
    Ok(read_head(r, parse_request_head)
        .await?
        .map(|(head, pending)| {
            let [method, path, _] = head.start;
            (
                Request {
                    method,
                    path,
                    headers: head.headers,
                    body: Vec::new(),
                },
                pending,
            )
        }))
}

/// Reads one request (`None`: the client closed without sending anything).
pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    max_body: usize,
) -> Result<Option<Request>, HttpError> {
    let Some((mut request, pending)) = read_request_head(r).await? else {
        return Ok(None);
    };
    request.body = read_body(r, pending, max_body).await?;
    Ok(Some(request))
}

/// Reads one response.
pub async fn read_response<R: AsyncRead + Unpin>(
    r: &mut R,
    max_body: usize,
) -> Result<Response, HttpError> {
    let (head, pending) = read_head(r, parse_response_head)
        .await?
        .ok_or(HttpError::Truncated("before sending a response"))?;
    let body = read_body(r, pending, max_body).await?;
    let status = head.start[1]
        .parse()
        .map_err(|_| malformed("bad status code"))?;
    Ok(Response {
        status,
        headers: head.headers,
        body,
    })
}

fn push_headers(out: &mut Vec<u8>, headers: &[(String, String)], body_len: usize) {
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("connection") {
            continue;
        }
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(
        format!("content-length: {body_len}\r\nconnection: close\r\n\r\n").as_bytes(),
    );
}

pub fn encode_request(req: &Request, host: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + req.body.len());
    out.extend_from_slice(
        format!("{} {} HTTP/1.1\r\nhost: {host}\r\n", req.method, req.path).as_bytes(),
    );
    push_headers(&mut out, &req.headers, req.body.len());
    out.extend_from_slice(&req.body);
    out
}

pub fn encode_response(resp: &Response) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + resp.body.len());
    out.extend_from_slice(
        format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status)).as_bytes(),
    );
    push_headers(&mut out, &resp.headers, resp.body.len());
    out.extend_from_slice(&resp.body);
    out
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    resp: &Response,
) -> Result<(), HttpError> {
    w.write_all(&encode_response(resp)).await?;
    w.flush().await?;
    Ok(())
}

/// Sends `req` and reads the answer (the server closes after it).
pub async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    host: &str,
    req: &Request,
    max_body: usize,
) -> Result<Response, HttpError> {
    stream.write_all(&encode_request(req, host)).await?;
    stream.flush().await?;
    read_response(stream, max_body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn req(bytes: &[u8], max: usize) -> Result<Option<Request>, HttpError> {
        let mut r = bytes;
        read_request(&mut r, max).await
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn a_request_round_trips_through_the_encoder_and_parser() {
        let r = Request::post(
            "/v1/ingest",
            "application/octet-stream",
            b"abc\r\n\r\nxyz".to_vec(),
        );
        let bytes = encode_request(&r, "collector");
        let back = block(req(&bytes, 100)).expect("parses").expect("a request");
        assert_eq!(back.method, "POST");
        assert_eq!(back.path, "/v1/ingest");
        assert_eq!(back.body, r.body);
        assert_eq!(back.header("Host"), Some("collector"));
    }

    #[test]
    fn a_response_round_trips() {
        let r = Response::error(403, "agent x is revoked");
        let bytes = encode_response(&r);
        let mut s = &bytes[..];
        let back = block(read_response(&mut s, 1000)).expect("parses");
        assert_eq!(back.status, 403);
        assert_eq!(back.error_message(), "agent x is revoked");
    }

    #[test]
    fn every_strict_prefix_of_a_message_is_truncated_not_accepted() {
        let bytes = encode_request(&Request::post("/x", "a/b", vec![7; 50]), "h");
        for n in 1..bytes.len() {
            match block(req(&bytes[..n], 100)) {
                Err(HttpError::Truncated(_)) => {}
                other => panic!("prefix {n}: {other:?}"),
            }
        }
        assert!(matches!(block(req(b"", 100)), Ok(None)));
    }

    #[test]
    fn malformed_heads_are_refused_with_400() {
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"GET / HTTP/2\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nx",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\n\r\nxy",
            b"GET / HTTP/1.1\r\nh\xff: x\r\n\r\n",
        ] {
            let e = block(req(bad, 100)).expect_err("refused");
            assert_eq!(e.status(), 400, "{:?}: {e}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn an_oversized_body_is_refused_before_it_is_read() {
        let e = block(req(b"POST / HTTP/1.1\r\ncontent-length: 101\r\n\r\n", 100))
            .expect_err("too large");
        assert_eq!(e.status(), 413);
        let e = block(req(
            b"POST / HTTP/1.1\r\ncontent-length: 99999999999999999999999\r\n\r\n",
            100,
        ))
        .expect_err("too large");
        assert_eq!(e.status(), 400, "{e}");
    }

    #[test]
    fn an_endless_head_is_refused_at_the_limit() {
        let mut bytes = b"GET / HTTP/1.1\r\n".to_vec();
        while bytes.len() < MAX_HEAD + 10 {
            bytes.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let e = block(req(&bytes, 100)).expect_err("too large");
        assert_eq!(e.status(), 431);
        assert!(matches!(check(&bytes[..100]), Ok(None)));
    }
}
