//! Connections between nodes. Each node dials every other voter and sends on that connection only;
//! it receives on the connections the others dial to it. A connection starts with a handshake
//! that names the protocol, the cluster and both nodes, and carries the dialer's addresses; the
//! acceptor answers `RLPEEROK` or `RLPEERNO` and a reason, so a node of another cluster (another
//! seed list) or a misconfigured id is refused with a log line on both sides. Frames after it are
//! `replication::wire` frames.
//!
//! Depends on glommio's TCP, `replication::wire` and serde_json for the addresses.

use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"RLPEER01";
const ACCEPTED: &[u8; 8] = b"RLPEEROK";
const REFUSED: &[u8; 8] = b"RLPEERNO";
const INFO_BYTES_MAX: usize = 4096;
/// A frame longer than this is refused and the connection closed.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a node tells its peers about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u64,
    pub peer: String,
    pub native: String,
    pub kafka: Option<String>,
    pub admin: String,
}

pub struct Hello {
    pub cluster_id: u64,
    pub from: u64,
    pub to: u64,
    pub info: NodeInfo,
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

/// Dialer: sends the handshake and waits for the answer.
pub async fn greet(stream: &mut TcpStream, hello: &Hello) -> std::io::Result<()> {
    let info = serde_json::to_vec(&hello.info).map_err(|e| invalid(e.to_string()))?;
    let mut out = Vec::with_capacity(36 + info.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&hello.cluster_id.to_be_bytes());
    out.extend_from_slice(&hello.from.to_be_bytes());
    out.extend_from_slice(&hello.to.to_be_bytes());
    out.extend_from_slice(&(info.len() as u32).to_be_bytes());
    out.extend_from_slice(&info);
    stream.write_all(&out).await?;
    let mut answer = [0u8; 8];
    stream.read_exact(&mut answer).await?;
    if &answer == ACCEPTED {
        return Ok(());
    }
    let mut reason = vec![0u8; 256];
    let n = stream.read(&mut reason).await.unwrap_or(0);
    Err(invalid(format!("refused: {}", String::from_utf8_lossy(&reason[..n]).trim())))
}

/// Acceptor: reads the handshake; `check` says why it is refused, if it is.
pub async fn welcome(
    stream: &mut TcpStream,
    check: impl FnOnce(&Hello) -> Result<(), String>,
) -> std::io::Result<Hello> {
    let mut head = [0u8; 36];
    stream.read_exact(&mut head).await?;
    if &head[..8] != MAGIC {
        return Err(invalid("not a ringlog peer (bad magic)".into()));
    }
    let be = |at: usize| u64::from_be_bytes(head[at..at + 8].try_into().unwrap_or_default());
    let (cluster_id, from, to) = (be(8), be(16), be(24));
    let info_len = u32::from_be_bytes([head[32], head[33], head[34], head[35]]) as usize;
    if info_len > INFO_BYTES_MAX {
        return Err(invalid(format!("peer {from}: handshake of {info_len} bytes")));
    }
    let mut info = vec![0u8; info_len];
    stream.read_exact(&mut info).await?;
    let info: NodeInfo =
        serde_json::from_slice(&info).map_err(|e| invalid(format!("peer {from}: handshake: {e}")))?;
    let hello = Hello { cluster_id, from, to, info };
    match check(&hello) {
        Ok(()) => {
            stream.write_all(ACCEPTED).await?;
            Ok(hello)
        }
        Err(reason) => {
            let mut out = REFUSED.to_vec();
            out.extend_from_slice(reason.as_bytes());
            let _ = stream.write_all(&out).await;
            Err(invalid(format!("refused peer {from}: {reason}")))
        }
    }
}

/// Reads one frame (length prefix included, as `wire::decode` takes it).
/// Parts of a frame below this are gathered into one send; larger ones are sent from where they
/// are (a batch of records is never copied on its way out).
pub const GATHER_BYTES_MAX: usize = 64 << 10;

/// Writes `frame` (its head, with the length prefix, then its payload), gathering runs of small
/// parts in `scratch` so a frame of many small entries costs few sends and one of large entries
/// costs no copy.
pub async fn write_frame(
    stream: &mut TcpStream,
    frame: &crate::replication::wire::EncodedFrame,
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    scratch.clear();
    scratch.extend_from_slice(&frame.head);
    for part in &frame.payload {
        if scratch.len() + part.len() > GATHER_BYTES_MAX && !scratch.is_empty() {
            stream.write_all(scratch).await?;
            scratch.clear();
        }
        if part.len() >= GATHER_BYTES_MAX {
            stream.write_all(part).await?;
        } else {
            scratch.extend_from_slice(part);
        }
    }
    if !scratch.is_empty() {
        stream.write_all(scratch).await?;
    }
    Ok(())
}

pub async fn read_frame(stream: &mut TcpStream) -> std::io::Result<bytes::Bytes> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(invalid(format!("frame of {len} bytes, more than {FRAME_BYTES_MAX}")));
    }
    let mut frame = vec![0u8; 4 + len];
    frame[..4].copy_from_slice(&prefix);
    stream.read_exact(&mut frame[4..]).await?;
    Ok(bytes::Bytes::from(frame))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use glommio::net::TcpListener;
    use glommio::LocalExecutorBuilder;
    use raft::eraftpb::{Entry, Message, MessageType};

    use super::*;
    use crate::replication::wire::{self, GroupKey, PeerBatch};

    /// A frame of one append whose entries are `sizes` bytes long.
    fn frame(sizes: &[usize]) -> wire::EncodedFrame {
        let mut append = Message::default();
        append.set_msg_type(MessageType::MsgAppend);
        append.term = 3;
        (append.from, append.to) = (1, 2);
        let entries: Vec<Entry> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| Entry {
                term: 3,
                index: i as u64 + 1,
                data: Bytes::from(vec![i as u8; size]),
                ..Default::default()
            })
            .collect();
        append.set_entries(entries.into());
        let batch = PeerBatch {
            from_node: 1,
            to_node: 2,
            messages: vec![(GroupKey { topic_id: 7, partition: 0 }, append)],
            ..PeerBatch::default()
        };
        wire::encode(&batch)
    }

    #[test]
    fn frames_written_in_gathered_and_direct_parts_arrive_whole() {
        let frames = vec![
            frame(&[]),
            frame(&[10; 5000]),
            frame(&[GATHER_BYTES_MAX * 3]),
            frame(&[100, GATHER_BYTES_MAX, 7, GATHER_BYTES_MAX - 1, 2, 300 << 10, 1]),
        ];
        let expected: Vec<Vec<u8>> = frames.iter().map(wire::EncodedFrame::to_vec).collect();
        let head_max = frames.iter().map(|f| f.head.len()).max().unwrap_or(0);
        LocalExecutorBuilder::default()
            .spawn(move || async move {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let count = frames.len();
                let reader = glommio::spawn_local(async move {
                    let mut stream = listener.accept().await.unwrap();
                    let mut read = Vec::new();
                    for _ in 0..count {
                        read.push(read_frame(&mut stream).await.unwrap().to_vec());
                    }
                    read
                });
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let mut scratch = Vec::new();
                for frame in &frames {
                    write_frame(&mut stream, frame, &mut scratch).await.unwrap();
                }
                // A head is sent whole; no large part ever goes through the scratch buffer.
                assert!(scratch.capacity() <= 2 * head_max.max(GATHER_BYTES_MAX), "{}", scratch.capacity());
                assert_eq!(reader.await, expected);
                for read in &expected {
                    if let Err(e) = wire::decode(Bytes::from(read.clone())) {
                        panic!("{} bytes: {e}", read.len());
                    }
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
