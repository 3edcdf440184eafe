//! A client of the management API, used by the CLI and the tests.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

use crate::http::{self, HttpError, Response};
use crate::server::CONSOLE_PROTOCOL;

/// The most bytes of response body the client accepts (a console log is at
/// most 2 MiB).
const MAX_RESPONSE: usize = 8 * 1024 * 1024;

/// Errors of an API call.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to the daemon at {0} (is 'ferrovisor daemon' running?)")]
    Connect(String, #[source] std::io::Error),
    #[error("cannot talk to the daemon")]
    Io(#[from] std::io::Error),
    #[error("bad response from the daemon")]
    Http(#[from] HttpError),
    #[error("the daemon sent a body that is not JSON")]
    NotJson,
    /// The daemon refused: its status and error message.
    #[error("{message}")]
    Api { status: u16, message: String },
}

/// A connection factory for one daemon socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket)
            .map_err(|e| ClientError::Connect(self.socket.display().to_string(), e))
    }

    /// Sends one request and returns the raw response, whatever its status.
    pub fn raw(
        &self,
        method: &str,
        target: &str,
        body: Option<&Value>,
    ) -> Result<Response, ClientError> {
        let mut stream = self.connect()?;
        let body = body.map(Value::to_string);
        let sent = http::write_request(
            &mut stream,
            method,
            target,
            &[],
            body.as_deref().map(str::as_bytes),
        );
        let mut reader = BufReader::new(stream);
        match (sent, http::read_response(&mut reader, MAX_RESPONSE)) {
            (_, Ok(response)) => Ok(response),
            // The daemon may answer (403, 503) before it reads the request
            // and close; then the write fails but the answer is there.
            (Err(e), Err(_)) => Err(e.into()),
            (Ok(()), Err(e)) => Err(e.into()),
        }
    }

    /// Sends one request; a 2xx JSON body is returned, anything else is
    /// an `Api` error carrying the daemon's message.
    pub fn call(
        &self,
        method: &str,
        target: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let response = self.raw(method, target, body)?;
        let value: Value =
            serde_json::from_slice(&response.body).map_err(|_| ClientError::NotJson)?;
        if (200..300).contains(&response.status) {
            Ok(value)
        } else {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the daemon gave no reason")
                .to_string();
            Err(ClientError::Api {
                status: response.status,
                message,
            })
        }
    }

    /// The console log of `name` (its last `tail` bytes if given).
    pub fn console_log(&self, name: &str, tail: Option<u64>) -> Result<Vec<u8>, ClientError> {
        let target = match tail {
            Some(n) => format!("/guests/{name}/console?tail={n}"),
            None => format!("/guests/{name}/console"),
        };
        let response = self.raw("GET", &target, None)?;
        if response.status == 200 {
            return Ok(response.body);
        }
        let value: Value =
            serde_json::from_slice(&response.body).map_err(|_| ClientError::NotJson)?;
        Err(ClientError::Api {
            status: response.status,
            message: value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the daemon gave no reason")
                .to_string(),
        })
    }

    /// Attaches to the console of `name`: the returned stream carries the
    /// guest's console output and takes its input.
    pub fn attach(&self, name: &str) -> Result<(BufReader<UnixStream>, UnixStream), ClientError> {
        let mut stream = self.connect()?;
        http::write_request(
            &mut stream,
            "GET",
            &format!("/guests/{name}/console/attach"),
            &[("Connection", "Upgrade"), ("Upgrade", CONSOLE_PROTOCOL)],
            None,
        )?;
        let writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let head = http::read_response_head(&mut reader)?;
        if head.status == 101 {
            return Ok((reader, writer));
        }
        // The head is read: what follows is the error body (read to EOF,
        // as the daemon closes after it).
        let mut body = Vec::new();
        let _ =
            std::io::Read::read_to_end(&mut std::io::Read::take(&mut reader, 64 * 1024), &mut body);
        Err(api_error(head.status, &body))
    }

    /// Subscribes to lifecycle events: each item is one event.
    pub fn events(&self) -> Result<Events, ClientError> {
        let mut stream = self.connect()?;
        http::write_request(&mut stream, "GET", "/events", &[], None)?;
        let mut reader = BufReader::new(stream);
        let head = http::read_response_head(&mut reader)?;
        if head.status != 200 {
            return Err(api_error(head.status, b""));
        }
        Ok(Events {
            reader,
            pending: Vec::new(),
        })
    }
}

fn api_error(status: u16, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| format!("the daemon answered {status}"));
    ClientError::Api { status, message }
}

/// A stream of lifecycle events (newline-delimited JSON in chunks).
#[derive(Debug)]
pub struct Events {
    reader: BufReader<UnixStream>,
    pending: Vec<u8>,
}

impl Events {
    /// The underlying connection (to set a read timeout).
    pub fn stream(&self) -> &UnixStream {
        self.reader.get_ref()
    }

    /// The next event; `None` when the stream ended.
    pub fn next_event(&mut self) -> Result<Option<Value>, ClientError> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let value = serde_json::from_slice(&line).map_err(|_| ClientError::NotJson)?;
                return Ok(Some(value));
            }
            match http::read_chunk(&mut self.reader)? {
                Some(chunk) => self.pending.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }
}
