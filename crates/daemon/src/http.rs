//! A minimal HTTP/1.1 codec for the management API: just what a JSON API on a
//! unix socket needs. One request per connection (every response says
//! `Connection: close`), bodies framed by `Content-Length` only, bounded
//! header and body sizes, chunked encoding for streamed responses.
//!
//! Both sides live here: the server reads requests and writes responses, the
//! client library writes requests and reads responses.

use std::io::{self, BufRead, Read, Write};

use thiserror::Error;

/// The most bytes of request line plus headers accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// The most bytes of request body accepted (guest descriptions are small).
pub const MAX_BODY: usize = 1024 * 1024;
/// The most header lines accepted.
const MAX_HEADERS: usize = 64;

/// Errors reading an HTTP message.
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("connection closed before a complete message")]
    Closed,
    #[error("cannot read the message")]
    Io(#[from] io::Error),
    #[error("malformed request line")]
    BadRequestLine,
    #[error("malformed status line")]
    BadStatusLine,
    #[error("unsupported HTTP version '{0}'")]
    BadVersion(String),
    #[error("malformed header line")]
    BadHeader,
    #[error("the message head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("bad Content-Length")]
    BadLength,
    #[error("the body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("chunked request bodies are not supported; send Content-Length")]
    Chunked,
    #[error("the message head is not valid UTF-8")]
    NotUtf8,
    #[error("malformed chunked encoding")]
    BadChunk,
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// The query string's `key=value` pairs, percent-decoded.
    pub query: Vec<(String, String)>,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first query parameter named `name`.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one line ending in LF (CR LF accepted), counting against `budget`.
fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> Result<String, HttpError> {
    let mut line = Vec::new();
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Err(HttpError::Closed);
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if take > *budget {
            return Err(HttpError::HeadTooLarge);
        }
        *budget -= take;
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            break;
        }
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| HttpError::NotUtf8)
}

/// Reads header lines up to the blank line.
fn read_headers(
    reader: &mut impl BufRead,
    budget: &mut usize,
) -> Result<Vec<(String, String)>, HttpError> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, budget)?;
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::TooManyHeaders);
        }
        let (name, value) = line.split_once(':').ok_or(HttpError::BadHeader)?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(HttpError::BadHeader);
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
}

fn content_length(headers: &[(String, String)]) -> Result<Option<usize>, HttpError> {
    let mut found = None;
    for (name, value) in headers {
        if name == "content-length" {
            let n: usize = value.parse().map_err(|_| HttpError::BadLength)?;
            if found.is_some_and(|f| f != n) {
                return Err(HttpError::BadLength);
            }
            found = Some(n);
        }
    }
    Ok(found)
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"))
}

/// Decodes `%XX` escapes and `+` in a query component.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one request with a body of at most `max_body` bytes.
pub fn read_request(reader: &mut impl BufRead, max_body: usize) -> Result<Request, HttpError> {
    read_request_with(reader, max_body, &mut || Ok(()))
}

/// Reads one request; `on_continue` is called before the body is read when
/// the client sent `Expect: 100-continue` (it should answer `100 Continue`).
pub fn read_request_with(
    reader: &mut impl BufRead,
    max_body: usize,
    on_continue: &mut dyn FnMut() -> io::Result<()>,
) -> Result<Request, HttpError> {
    let mut budget = MAX_HEAD;
    let line = read_line(reader, &mut budget)?;
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(HttpError::BadRequestLine);
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::BadRequestLine);
    }
    if !target.starts_with('/') {
        return Err(HttpError::BadRequestLine);
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::BadVersion(version.to_string()));
    }
    let headers = read_headers(reader, &mut budget)?;
    if is_chunked(&headers) {
        return Err(HttpError::Chunked);
    }
    let length = content_length(&headers)?.unwrap_or(0);
    if length > max_body {
        return Err(HttpError::BodyTooLarge(max_body));
    }
    let expects_continue = headers
        .iter()
        .any(|(k, v)| k == "expect" && v.eq_ignore_ascii_case("100-continue"));
    if expects_continue && length > 0 {
        on_continue()?;
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => HttpError::Closed,
        _ => HttpError::Io(e),
    })?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect();
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

/// A unix stream whose reads share one deadline: a client has until then
/// to send its whole request (head and body), however it spaces its bytes.
/// Without a deadline, reads block as the stream does.
#[derive(Debug)]
pub struct DeadlineStream {
    stream: std::os::unix::net::UnixStream,
    until: Option<std::time::Instant>,
}

impl DeadlineStream {
    /// Reads from `stream` must all be done by `until`.
    pub fn new(stream: std::os::unix::net::UnixStream, until: std::time::Instant) -> Self {
        DeadlineStream {
            stream,
            until: Some(until),
        }
    }

    /// Lifts the deadline (a stream that outlives its request).
    pub fn clear_deadline(&mut self) -> io::Result<()> {
        self.until = None;
        self.stream.set_read_timeout(None)
    }

    /// The stream.
    pub fn get_ref(&self) -> &std::os::unix::net::UnixStream {
        &self.stream
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(until) = self.until {
            let left = until
                .checked_duration_since(std::time::Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "request deadline"))?;
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

/// The reason phrase of the status codes the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a complete response with a body and closes the exchange.
pub fn write_response(
    out: &mut impl Write,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body)?;
    out.flush()
}

/// Writes the head of a streamed (chunked) response.
pub fn write_chunked_head(out: &mut impl Write, content_type: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    out.write_all(head.as_bytes())?;
    out.flush()
}

/// Writes one chunk; an empty `data` would end the stream, so it is skipped.
pub fn write_chunk(out: &mut impl Write, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    out.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
    out.write_all(data)?;
    out.write_all(b"\r\n")?;
    out.flush()
}

/// Ends a chunked stream.
pub fn write_last_chunk(out: &mut impl Write) -> io::Result<()> {
    out.write_all(b"0\r\n\r\n")?;
    out.flush()
}

/// A response as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Writes a request; `body` is sent with `Content-Length`.
pub fn write_request(
    out: &mut impl Write,
    method: &str,
    target: &str,
    extra_headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<()> {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: ferrovisor\r\n");
    for (k, v) in extra_headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if let Some(body) = body {
        out.write_all(body)?;
    }
    out.flush()
}

/// Reads a response's status line and headers.
pub fn read_response_head(reader: &mut impl BufRead) -> Result<Response, HttpError> {
    let mut budget = MAX_HEAD;
    let line = read_line(reader, &mut budget)?;
    let mut words = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (words.next(), words.next()) else {
        return Err(HttpError::BadStatusLine);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::BadVersion(version.to_string()));
    }
    let status: u16 = code.parse().map_err(|_| HttpError::BadStatusLine)?;
    let headers = read_headers(reader, &mut budget)?;
    Ok(Response {
        status,
        headers,
        body: Vec::new(),
    })
}

/// Reads one chunk of a chunked body; `None` at the last chunk.
pub fn read_chunk(reader: &mut impl BufRead) -> Result<Option<Vec<u8>>, HttpError> {
    let mut budget = MAX_HEAD;
    let line = read_line(reader, &mut budget)?;
    let size = line.split(';').next().unwrap_or("").trim();
    let size = usize::from_str_radix(size, 16).map_err(|_| HttpError::BadChunk)?;
    if size > MAX_BODY * 8 {
        return Err(HttpError::BadChunk);
    }
    let mut data = vec![0; size];
    reader.read_exact(&mut data)?;
    let end = read_line(reader, &mut budget)?;
    if !end.is_empty() {
        return Err(HttpError::BadChunk);
    }
    if size == 0 {
        return Ok(None);
    }
    Ok(Some(data))
}

/// Reads a whole response: `Content-Length`, chunked, or up to EOF.
pub fn read_response(reader: &mut impl BufRead, max_body: usize) -> Result<Response, HttpError> {
    let mut response = read_response_head(reader)?;
    if is_chunked(&response.headers) {
        while let Some(chunk) = read_chunk(reader)? {
            response.body.extend_from_slice(&chunk);
            if response.body.len() > max_body {
                return Err(HttpError::BodyTooLarge(max_body));
            }
        }
    } else if let Some(length) = content_length(&response.headers)? {
        if length > max_body {
            return Err(HttpError::BodyTooLarge(max_body));
        }
        response.body = vec![0; length];
        reader.read_exact(&mut response.body)?;
    } else {
        reader
            .take(max_body as u64 + 1)
            .read_to_end(&mut response.body)?;
        if response.body.len() > max_body {
            return Err(HttpError::BodyTooLarge(max_body));
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn parse(text: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut BufReader::new(text), 64)
    }

    #[test]
    fn request_with_body_and_query() {
        let r = parse(b"POST /guests/a/stop?timeout=5&x=a%20b HTTP/1.1\r\nContent-Length: 2\r\nX-Y: z\r\n\r\n{}")
            .expect("parses");
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/guests/a/stop");
        assert_eq!(r.query("timeout"), Some("5"));
        assert_eq!(r.query("x"), Some("a b"));
        assert_eq!(r.header("x-y"), Some("z"));
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn malformed_requests_are_refused() {
        assert!(matches!(
            parse(b"GARBAGE\r\n\r\n"),
            Err(HttpError::BadRequestLine)
        ));
        assert!(matches!(
            parse(b"GET / HTTP/2\r\n\r\n"),
            Err(HttpError::BadVersion(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"),
            Err(HttpError::BadHeader)
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(HttpError::BadLength)
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n"),
            Err(HttpError::BodyTooLarge(64))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HttpError::Chunked)
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(HttpError::Closed)
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}"),
            Err(HttpError::Closed)
        ));
    }

    #[test]
    fn expect_continue_is_answered_before_the_body() {
        let text = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}";
        let mut called = 0;
        let r = read_request_with(&mut BufReader::new(&text[..]), 64, &mut || {
            called += 1;
            Ok(())
        })
        .expect("parses");
        assert_eq!(called, 1);
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn random_and_mangled_requests_never_panic() {
        let pieces: [&[u8]; 12] = [
            b"GET ",
            b"POST ",
            b"/guests",
            b"?a=%zz&b=%4",
            b" HTTP/1.1",
            b"\r\n",
            b"Content-Length: 3",
            b"Content-Length: 99999999999999999999",
            b"Expect: 100-continue",
            b":",
            b"\xff\xc3",
            b"%",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5000 {
            let mut input = Vec::new();
            for _ in 0..next() % 12 {
                match next() % 4 {
                    0 => input.push(next() as u8),
                    _ => input.extend_from_slice(pieces[(next() % 12) as usize]),
                }
            }
            let _ = read_request(&mut BufReader::new(&input[..]), 64);
            let _ = read_response(&mut BufReader::new(&input[..]), 64);
        }
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut text = b"GET / HTTP/1.1\r\nX: ".to_vec();
        text.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        text.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(parse(&text), Err(HttpError::HeadTooLarge)));
    }

    #[test]
    fn chunked_response_round_trip() {
        let mut out = Vec::new();
        write_chunked_head(&mut out, "application/x-ndjson").expect("write");
        write_chunk(&mut out, b"{\"a\":1}\n").expect("write");
        write_chunk(&mut out, b"{\"b\":2}\n").expect("write");
        write_last_chunk(&mut out).expect("write");
        let r = read_response(&mut BufReader::new(&out[..]), 1024).expect("parses");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{\"a\":1}\n{\"b\":2}\n");
    }

    #[test]
    fn plain_response_round_trip() {
        let mut out = Vec::new();
        write_response(&mut out, 409, "application/json", b"{\"error\":\"x\"}").expect("write");
        let r = read_response(&mut BufReader::new(&out[..]), 1024).expect("parses");
        assert_eq!(r.status, 409);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.body, b"{\"error\":\"x\"}");
    }

    #[test]
    fn one_deadline_covers_the_whole_request() {
        use std::os::unix::net::UnixStream;
        use std::time::{Duration, Instant};
        // A head that never ends: the read fails once the deadline passes.
        let (mut client, server) = UnixStream::pair().expect("pair");
        client.write_all(b"GET /guests HTTP/1.1\r\n").expect("send");
        let until = Instant::now() + Duration::from_millis(100);
        let mut reader = BufReader::new(DeadlineStream::new(server, until));
        match read_request(&mut reader, MAX_BODY) {
            Err(HttpError::Io(e)) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ),
                "{e}"
            ),
            other => panic!("not timed out: {other:?}"),
        }
        // Bytes that keep arriving do not extend it: past the deadline,
        // even a complete request waiting to be read is refused.
        let (mut client, server) = UnixStream::pair().expect("pair");
        client
            .write_all(b"GET /guests HTTP/1.1\r\n\r\n")
            .expect("send");
        let mut reader = BufReader::new(DeadlineStream::new(server, Instant::now()));
        match read_request(&mut reader, MAX_BODY) {
            Err(HttpError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            other => panic!("read past the deadline: {other:?}"),
        }
    }
}
