//! Text frames written to the socket straight from their shared bytes.
//!
//! A fan-out frame is serialised once and shared by every recipient
//! ([`Text`] is reference-counted). Writing it through the WebSocket
//! library would copy it into that connection's write buffer, which keeps its
//! largest size for the connection's life: one large `history` reply or
//! batched presence frame would leave every connection that saw it holding a
//! buffer that large. Here the frame header (server frames are unmasked) and
//! the shared payload go out together in one vectored write, with no copy and
//! no buffer that grows.
//!
//! Progress is kept outside the write future, so a write interrupted between
//! two system calls (a close decided meanwhile, a deadline) knows whether it
//! stopped inside a frame: the close frame may only follow a whole frame.

use std::{collections::VecDeque, io, io::IoSlice, time::Duration};

use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    time::timeout,
};

use crate::protocol::Outgoing;

/// Frames per vectored write at most (up to four slices each).
const SLICES_FRAMES: usize = 64;

/// How frames are framed on the wire: WebSocket text frames, or Server-Sent
/// Events (`data: <json>` and a blank line; rendered JSON holds no newline).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Framing {
    #[default]
    WebSocket,
    Sse,
}

/// What ends an SSE event.
const SSE_TAIL: &[u8] = b"\n\n";

/// A frame header (WebSocket: FIN + text opcode, then the payload length;
/// SSE: `data: `) and the length of its tail (SSE: the blank line).
#[derive(Debug, Clone, Copy)]
struct Header {
    bytes: [u8; 10],
    len: u8,
    tail: u8,
}

impl Header {
    fn new(framing: Framing, payload: usize) -> Header {
        match framing {
            Framing::WebSocket => Header::text(payload),
            Framing::Sse => {
                let mut bytes = [0u8; 10];
                bytes[..6].copy_from_slice(b"data: ");
                Header { bytes, len: 6, tail: SSE_TAIL.len() as u8 }
            }
        }
    }

    fn text(payload: usize) -> Header {
        Header::websocket(0x81, payload)
    }

    /// FIN and `opcode` in the first byte (0x81 text, 0x82 binary).
    fn websocket(first: u8, payload: usize) -> Header {
        let mut bytes = [0u8; 10];
        bytes[0] = first;
        let len = if payload < 126 {
            bytes[1] = payload as u8;
            2
        } else if payload <= u16::MAX as usize {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&(payload as u16).to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(payload as u64).to_be_bytes());
            10
        };
        Header { bytes, len, tail: 0 }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    fn tail(&self) -> &'static [u8] {
        &SSE_TAIL[..self.tail as usize]
    }

    /// Header and tail bytes around the payload.
    fn overhead(&self) -> usize {
        self.len as usize + self.tail as usize
    }
}

/// Text frames waiting for the socket, and how far the first one got.
#[derive(Debug, Default)]
pub struct Writer {
    frames: VecDeque<(Header, Outgoing)>,
    /// Bytes of the first frame (header and payload) already written.
    done: usize,
    framing: Framing,
}

impl Writer {
    /// A writer of `framing` frames.
    pub fn new(framing: Framing) -> Writer {
        Writer { framing, ..Writer::default() }
    }

    pub fn push(&mut self, frame: impl Into<Outgoing>) {
        let frame = frame.into();
        self.frames.push_back((Header::new(self.framing, frame.len()), frame));
    }

    /// A binary frame (the chat sends none; the conformance echo does, see
    /// [`echo`](super::echo)).
    pub fn push_binary(&mut self, payload: tungstenite::Bytes) {
        let len = payload.len();
        self.frames.push_back((Header::websocket(0x82, len), Outgoing::Cut(Box::new([payload, Default::default()]))));
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether a frame was partly written: nothing else (no close frame) may
    /// go out before its rest.
    pub fn mid_frame(&self) -> bool {
        self.done > 0
    }

    /// Drops the frames not started yet (a slow consumer's backlog); the one
    /// in progress stays, so it can be finished before a close frame.
    pub fn keep_current(&mut self) {
        let keep = usize::from(self.mid_frame());
        self.frames.truncate(keep);
    }

    /// Writes every frame and flushes. Cancel-safe between system calls:
    /// what was written stays accounted for. A system call that accepts no
    /// byte within `stall` fails with [`io::ErrorKind::TimedOut`]: the bound
    /// is on progress (PROTOCOL v1.1: "a socket write that makes no progress
    /// for `limits.write_timeout_s`"), so a slow reader that keeps reading is
    /// never cut off in the middle of a long backlog.
    pub async fn write_to<S: AsyncWrite + Unpin>(&mut self, io: &mut S, stall: Duration) -> io::Result<()> {
        while !self.frames.is_empty() {
            let n = {
                let mut slices = Vec::with_capacity(4 * self.frames.len().min(SLICES_FRAMES));
                for (i, (h, f)) in self.frames.iter().take(SLICES_FRAMES).enumerate() {
                    let [a, b] = f.parts();
                    let mut skip = if i == 0 { self.done } else { 0 };
                    for part in [h.as_slice(), a, b, h.tail()] {
                        if skip >= part.len() {
                            skip -= part.len();
                            continue;
                        }
                        slices.push(IoSlice::new(&part[skip..]));
                        skip = 0;
                    }
                }
                stalled(stall, io.write_vectored(&slices)).await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.advance(n);
        }
        // Written out: an idle connection keeps no slots from its last burst.
        self.frames = VecDeque::new();
        stalled(stall, io.flush()).await
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some((h, t)) = self.frames.front() else { return };
            let left = h.overhead() + t.len() - self.done;
            if n >= left {
                n -= left;
                self.done = 0;
                self.frames.pop_front();
            } else {
                self.done += n;
                n = 0;
            }
        }
    }
}

/// Runs one socket operation, failing with [`io::ErrorKind::TimedOut`] when
/// it makes no progress within `stall`.
/// (Errors of the operation itself come back as [`io::ErrorKind::Other`].)
pub(super) async fn stalled<T, E>(stall: Duration, op: impl Future<Output = Result<T, E>>) -> io::Result<T>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match timeout(stall, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(io::Error::other(e)),
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::WebSocketStream;
    use tungstenite::{Message, protocol::Role};

    use super::*;
    use crate::protocol::Text;

    #[tokio::test]
    async fn frames_of_every_length_class_read_back_whole() {
        let (mut server, client) = tokio::io::duplex(1 << 20);
        let mut w = Writer::default();
        let bodies: Vec<String> = [0usize, 1, 125, 126, 127, 65_535, 65_536, 200_000]
            .iter()
            .map(|n| "é".repeat(n / 2) + &"x".repeat(n % 2))
            .collect();
        for b in &bodies {
            w.push(Text::from(b.clone()));
        }
        w.write_to(&mut server, Duration::from_secs(5)).await.unwrap();
        assert!(w.is_empty() && !w.mid_frame());
        let mut c = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        for b in &bodies {
            assert_eq!(c.next().await.unwrap().unwrap(), Message::Text(b.clone().into()));
        }
    }

    #[tokio::test]
    async fn a_write_cut_short_resumes_inside_the_frame() {
        // A pipe of 7 bytes: every write is partial.
        let (mut server, mut client) = tokio::io::duplex(7);
        let mut w = Writer::default();
        w.push(Text::from("hello, world".to_string()));
        w.push(Text::from("again".to_string()));
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut buf = [0u8; 3];
            loop {
                match client.read(&mut buf).await.unwrap() {
                    0 => return all,
                    n => all.extend_from_slice(&buf[..n]),
                }
            }
        });
        w.write_to(&mut server, Duration::from_secs(5)).await.unwrap();
        drop(server);
        let got = reader.await.unwrap();
        assert_eq!(got, [&[0x81, 12][..], b"hello, world", &[0x81, 5], b"again"].concat());
    }

    #[tokio::test]
    async fn a_cut_frame_resumes_inside_either_part() {
        let whole = Text::from("[1,2,3]".to_string());
        let cut = Outgoing::cut(&whole, 2..4);
        let (mut server, mut client) = tokio::io::duplex(2);
        let mut w = Writer::default();
        w.push(cut);
        w.push(whole);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        });
        w.write_to(&mut server, Duration::from_secs(5)).await.unwrap();
        drop(server);
        assert_eq!(reader.await.unwrap(), [&[0x81, 5][..], b"[1,3]", &[0x81, 7], b"[1,2,3]"].concat());
    }

    #[tokio::test(start_paused = true)]
    async fn the_stall_bound_is_on_progress_not_on_the_whole_write() {
        // A reader that takes 16 bytes every 300 ms: the whole write takes far
        // longer than the 1 s bound, but no single step waits that long.
        let (mut server, mut client) = tokio::io::duplex(16);
        let mut w = Writer::default();
        w.push(Text::from("x".repeat(400)));
        let slow = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut buf = [0u8; 16];
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                match client.read(&mut buf).await.unwrap() {
                    0 => return all.len(),
                    n => all.extend_from_slice(&buf[..n]),
                }
            }
        });
        let started = tokio::time::Instant::now();
        w.write_to(&mut server, Duration::from_secs(1)).await.unwrap();
        assert!(started.elapsed() > Duration::from_secs(5), "the write was slow on purpose");
        drop(server);
        assert_eq!(slow.await.unwrap(), 404, "header (4 bytes) and payload");

        // A reader that stops: the write ends after the bound, mid-frame.
        let (mut server, _client) = tokio::io::duplex(16);
        let mut w = Writer::default();
        w.push(Text::from("x".repeat(400)));
        let err = w.write_to(&mut server, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(w.mid_frame());
    }

    #[tokio::test]
    async fn sse_events_are_data_lines_and_a_blank_line() {
        let (mut server, mut client) = tokio::io::duplex(5);
        let mut w = Writer::new(Framing::Sse);
        w.push(Text::from("{\"a\":1}".to_string()));
        w.push(Outgoing::cut(&Text::from("[1,2,3]".to_string()), 2..4));
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        });
        w.write_to(&mut server, Duration::from_secs(5)).await.unwrap();
        drop(server);
        assert_eq!(reader.await.unwrap(), b"data: {\"a\":1}\n\ndata: [1,3]\n\n");
    }

    #[test]
    fn advance_tracks_the_position_inside_a_frame() {
        let mut w = Writer::default();
        w.push(Text::from("abc".to_string()));
        w.push(Text::from("de".to_string()));
        w.advance(3);
        assert!(w.mid_frame());
        w.keep_current();
        assert_eq!(w.frames.len(), 1, "the started frame stays, the rest goes");
        w.advance(2);
        assert!(w.is_empty() && !w.mid_frame());
    }
}
