//! An error as one log line: its message and its causes, each said once.
//!
//! A log line holds one event, and log pipelines split on newlines, so an error must render
//! on one line. Its `Display` alone often hides the cause (a client error says "client
//! error (Connect)" and keeps "Connection refused" in its source), while `Debug` is a dump
//! of the types (`DispatchFailure(DispatchFailure { source: ConnectorError {...`) an operator
//! cannot act on. [`OneLine`] walks the source chain instead.

use std::error::Error;
use std::fmt;

/// Displays an error and each cause in its source chain, joined by `": "`, on one line.
///
/// Many of our errors already put their cause in their message (`spool {path}: fsync:
/// {source}`) and also return it as their source, so a cause whose text the line already
/// holds is left out rather than repeated. Line breaks in a message (a Kubernetes status, a
/// server's error body) become spaces.
pub struct OneLine<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain(self.0))
    }
}

/// The text [`OneLine`] displays.
fn chain(e: &(dyn Error + 'static)) -> String {
    let mut line = flat(&e.to_string());
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = flat(&c.to_string());
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// `text` with its line breaks (and the blanks around them) as one space.
fn flat(text: &str) -> String {
    if !text.contains(['\n', '\r']) {
        return text.to_owned();
    }
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer {
        text: &'static str,
        source: Option<Box<Layer>>,
    }

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.text)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.source.as_deref().map(|l| l as &(dyn Error + 'static))
        }
    }

    fn layers(texts: &[&'static str]) -> Layer {
        let mut e: Option<Box<Layer>> = None;
        for text in texts.iter().rev() {
            e = Some(Box::new(Layer { text, source: e }));
        }
        *e.unwrap()
    }

    #[test]
    fn every_cause_once_on_one_line() {
        let e = layers(&[
            "client error (Connect)",
            "tcp connect error",
            "Connection refused",
        ]);
        assert_eq!(
            OneLine(&e).to_string(),
            "client error (Connect): tcp connect error: Connection refused"
        );
        // A message that already holds its cause does not repeat it.
        let e = layers(&[
            "spool /s/a.gz: fsync: No space left on device",
            "No space left on device",
        ]);
        assert_eq!(
            OneLine(&e).to_string(),
            "spool /s/a.gz: fsync: No space left on device"
        );
        let e = layers(&["watch failed", "Status 500:\n  etcd timeout\r\n"]);
        assert_eq!(
            OneLine(&e).to_string(),
            "watch failed: Status 500: etcd timeout"
        );
    }
}
