//! Closing (RFC 6455): the close frame carries the first code decided; then
//! the session reads and discards until the client's close frame or
//! [`LINGER`], so the code reaches the client instead of a reset. On HTTP
//! streaming the close is the last `close` event, then the response ends.

use super::*;

/// How long the server waits for the client's close frame after its own.
pub(super) const LINGER: Duration = Duration::from_secs(2);

/// How a session's run ended, and so how it closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Close with this code: the socket is healthy, replies queued before
    /// the decision go out first (except after 1013).
    Close(u16),
    /// The client broke the WebSocket protocol (1002, 1007, 1009): the read
    /// side is unusable, so after the close frame the rest is discarded raw.
    Violation(u16),
    /// A write made no progress within `limits.write_timeout_s`.
    Stalled,
    /// The client closed (its close frame was answered) or the connection
    /// is gone.
    Gone,
}

/// Maps a read error to how the session ends.
pub(super) fn read_error(e: &tungstenite::Error) -> End {
    use tungstenite::Error as E;
    match e {
        E::Capacity(_) => End::Violation(close::TOO_BIG),
        E::Utf8(_) => End::Violation(close::INVALID_DATA),
        E::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        E::Protocol(_) => End::Violation(close::PROTOCOL_ERROR),
        _ => End::Gone,
    }
}

pub(super) fn close_message(code: u16) -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: close::reason(code).into() }))
}

/// Ends a session: the close (after the replies queued before the decision,
/// unless the client is too slow for them), the lingering read, then the end
/// of the connection. The same for every [`Wire`].
pub async fn finish<W: Wire>(
    wire: &mut W,
    end: End,
    queued: Option<(&mut Writer, &Receiver)>,
    write_timeout: Duration,
) {
    match end {
        End::Gone => wire.gone().await,
        End::Stalled => {
            metrics::close(W::TRANSPORT, close::TRY_LATER);
            let whole = queued.as_ref().is_none_or(|(out, ..)| !out.mid_frame());
            if !whole || wire.send_close(close::TRY_LATER, Duration::from_secs(1)).await.is_err() {
                // The peer does not read (perhaps inside a frame): drop the connection.
                wire.reset();
                return;
            }
        }
        End::Close(code) => {
            if code != close::NORMAL {
                metrics::close(W::TRANSPORT, code);
            }
            // Each step is bounded by progress, not in total: a slow reader
            // that keeps reading gets its close frame.
            let sent: io::Result<()> = async {
                if let Some((out, rx)) = queued {
                    if code == close::TRY_LATER {
                        // A slow consumer's backlog is dropped; a frame cut
                        // short is finished, so the close frame can follow.
                        out.keep_current();
                    } else {
                        // Replies queued before the decision (the error that
                        // explains a 4008, say) go out first.
                        rx.drain(|_| true, |f| out.push(f));
                    }
                    wire.write(out, write_timeout).await?;
                }
                wire.send_close(code, write_timeout).await
            }
            .await;
            if sent.is_err() {
                // The close cannot be written (the peer stopped reading,
                // perhaps inside a frame): drop the connection.
                wire.reset();
                return;
            }
            wire.linger(Instant::now() + LINGER).await;
        }
        End::Violation(code) => {
            metrics::close(W::TRANSPORT, code);
            wire.violation(code).await;
        }
    }
    wire.shutdown().await;
}

/// Reads and discards raw bytes until the peer closes or `deadline`, so
/// closing the socket does not reset a connection the client still writes to.
pub(super) async fn drain_raw<S: AsyncRead + Unpin>(io: &mut S, deadline: Instant) {
    // On the heap: this runs once per connection, at its end.
    let mut buf = vec![0u8; 4096];
    let _ = timeout_at(deadline, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}
