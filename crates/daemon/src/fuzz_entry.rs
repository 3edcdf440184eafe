//! The entry point for the `http` fuzz target in `fuzz/`, also called by
//! the unit test that replays `fuzz/regressions/http/`.

use std::io::{BufReader, Cursor};

use crate::http::{read_request_with, read_response};

/// Reads requests the way a connection to the API socket does, from
/// bytes a client sent. Input: byte 0 the reader's buffer size (1-256, so
/// lines and bodies arrive split across reads as they do from a socket),
/// byte 1 the body limit (bit 7: parse a response as the client does
/// instead), then the bytes on the wire. Up to eight pipelined requests
/// are read, as on a kept-alive connection. Never panics; every request
/// it accepts has an upper-case method, lower-case header names and a
/// body within the limit.
pub fn http(data: &[u8]) {
    let [capacity, limit, ref wire @ ..] = *data else {
        return;
    };
    let capacity = usize::from(capacity).max(1);
    let max_body = usize::from(limit & 0x7f) << 4;
    let mut reader = BufReader::with_capacity(capacity, Cursor::new(wire));
    if limit & 0x80 != 0 {
        if let Ok(response) = read_response(&mut reader, max_body) {
            assert!(
                response.body.len() <= max_body,
                "response body over the limit"
            );
        }
        return;
    }
    for _ in 0..8 {
        let mut continues = 0;
        let request = match read_request_with(&mut reader, max_body, &mut || {
            continues += 1;
            Ok(())
        }) {
            Ok(r) => r,
            Err(_) => return,
        };
        assert!(continues <= 1, "100-continue answered twice");
        assert!(!request.method.is_empty(), "empty method accepted");
        assert!(
            request.method.bytes().all(|b| b.is_ascii_uppercase()),
            "method {:?} accepted",
            request.method
        );
        for (name, _) in &request.headers {
            assert_eq!(name, &name.to_ascii_lowercase(), "header name case");
        }
        assert!(
            request.body.len() <= max_body,
            "request body over the limit"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::fuzz_entry::seeds;

    #[test]
    fn http_seeds_and_regressions_replay() {
        for (_, data) in seeds("http") {
            http(&data);
        }
    }
}
