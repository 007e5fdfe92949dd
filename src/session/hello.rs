//! Phase 1: authentication by `hello` when no token came at upgrade.

use super::*;

/// Phase 1: wait for a valid `hello`. Anything else before it (another
/// frame type, junk, binary, invalid UTF-8) is `unauthorized` and 4001.
pub(super) async fn authenticate<W: Wire>(
    node: &Node,
    ws: &mut W,
    write_timeout: Duration,
) -> Result<(Verified, Option<Value>), End> {
    let deadline = Instant::now() + Duration::from_secs(node.cfg.auth.hello_timeout_s);
    let refuse = |id: Option<Value>, message: String| (id, message);
    let (id, message) = loop {
        let text = match timeout_at(deadline, ws.recv()).await {
            Err(_) => return Err(End::Close(close::UNAUTHORIZED)),
            Ok(Read::Ended(end)) => return Err(end),
            Ok(Read::NotUtf8) => {
                metrics::frame_in("invalid");
                break refuse(None, "frames are UTF-8 text; authenticate with hello first".into());
            }
            Ok(Read::Binary) => {
                metrics::frame_in("binary");
                break refuse(None, "binary frames are not accepted; authenticate with hello first".into());
            }
            Ok(Read::Alive) => continue,
            Ok(Read::Text(t)) => t,
        };
        match protocol::parse(&text) {
            Ok(Inbound { id, cmd: Command::Hello { token } }) => {
                metrics::frame_in("hello");
                match node.auth.verify_token(&token) {
                    Ok(v) => return Ok((v, id)),
                    Err(e) => break refuse(id, e.to_string()),
                }
            }
            Ok(Inbound { id, cmd }) => {
                metrics::frame_in(cmd.kind());
                break refuse(id, "authenticate with hello first".into());
            }
            Err(e) => {
                metrics::frame_in("invalid");
                break refuse(e.id, format!("{}; authenticate with hello first", e.message));
            }
        }
    };
    let f = protocol::error_code(id.as_ref(), ErrorCode::Unauthorized, &message);
    write_direct(ws, f, kind::ERROR, write_timeout).await;
    Err(End::Close(close::UNAUTHORIZED))
}
