//! What a destination worker feeds a data stream's bytes into: in an authenticated
//! session the stream's record opener first (nothing reaches the parser, let alone
//! guest memory, before its record authenticated), then the frame parser.

use super::frames::{FrameParser, RxCounters, StreamEvent};
use crate::security::records::RecordOpener;
use crate::wire::WireError;

/// One data stream's inbound path.
pub struct Inbound {
    opener: Option<RecordOpener>,
    parser: FrameParser,
    /// Bytes read off the socket (records whole: what the source counts as sent).
    wire_bytes: u64,
}

impl Inbound {
    /// Bytes straight to `parser` (`opener` is `None`), or through `opener` first.
    pub fn new(opener: Option<RecordOpener>, parser: FrameParser) -> Self {
        Inbound {
            opener,
            parser,
            wire_bytes: 0,
        }
    }

    /// Consume the next bytes of the stream, as [`FrameParser::feed`].
    pub fn feed(
        &mut self,
        data: &[u8],
        on_event: &mut impl FnMut(StreamEvent),
    ) -> Result<(), WireError> {
        self.wire_bytes += data.len() as u64;
        match &mut self.opener {
            None => self.parser.feed(data, on_event),
            Some(opener) => {
                let parser = &mut self.parser;
                opener.feed(data, &mut |plaintext: &[u8]| {
                    parser.feed(plaintext, on_event)
                })
            }
        }
    }

    /// In a sealed stream, where the next bytes from the socket should go (read there
    /// directly, they are copied once, by the kernel, before the record opens in
    /// place); `None` for a plain stream, whose bytes go to [`Inbound::feed`].
    pub fn window(&mut self) -> Option<&mut [u8]> {
        self.opener.as_mut().map(RecordOpener::window)
    }

    /// `n` bytes were read into [`Inbound::window`]; as [`Inbound::feed`].
    pub fn filled(
        &mut self,
        n: usize,
        on_event: &mut impl FnMut(StreamEvent),
    ) -> Result<(), WireError> {
        self.wire_bytes += n as u64;
        let Some(opener) = &mut self.opener else {
            return Ok(());
        };
        let parser = &mut self.parser;
        opener.filled(n, &mut |plaintext: &[u8]| parser.feed(plaintext, on_event))
    }

    /// The stream closed: what is wrong with ending here, if anything (inside a
    /// record, or before the stream's end marker).
    pub fn at_eof(&self) -> Result<(), WireError> {
        if let Some(opener) = &self.opener {
            opener.at_end()?;
        }
        if !self.parser.is_ended() {
            return Err(WireError::UnexpectedEof("data stream"));
        }
        Ok(())
    }

    /// Bytes read off the socket so far.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// Rounds whose end marker arrived.
    pub fn rounds_ended(&self) -> u64 {
        self.parser.rounds_ended()
    }

    /// Whether the stream's end marker arrived.
    pub fn is_ended(&self) -> bool {
        self.parser.is_ended()
    }

    /// What arrived so far (frame bytes, after opening).
    pub fn counters(&self) -> RxCounters {
        self.parser.counters()
    }
}
