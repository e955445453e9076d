//! Errors on the terminal: an error and its causes on one line, each reason once.
//!
//! The error types here follow two conventions: some say their cause in their own text
//! (`"{path}: {source}"`, `#[error(transparent)]`, a `#[from]` variant shown as `"...: {0}"`) and
//! also return it as their `source()`, others only return it. Printing the text and then every
//! cause repeated the first kind's reasons two or three times; printing only the text lost the
//! second kind's. [`one_line`] prints both kinds once.

use std::error::Error;

/// `error`'s text followed by each cause in its chain, separated by ": ", leaving out a cause
/// whose text the line already holds.
pub fn one_line(error: &(dyn Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("the disk is on fire")]
        Fire,
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        /// Says its cause and returns it.
        #[error("cannot read x: {0}")]
        Says(#[from] Inner),
        /// Returns its cause only.
        #[error("cannot read y")]
        Hides(#[source] Inner),
        /// Transparent over an error that says its cause.
        #[error(transparent)]
        Through(Box<Outer>),
    }

    #[test]
    fn a_cause_the_text_already_says_is_not_repeated() {
        let line = one_line(&Outer::Says(Inner::Fire));
        assert_eq!(line, "cannot read x: the disk is on fire");
        let line = one_line(&Outer::Through(Box::new(Outer::Says(Inner::Fire))));
        assert_eq!(line, "cannot read x: the disk is on fire");
    }

    #[test]
    fn a_cause_the_text_does_not_say_is_added() {
        assert_eq!(
            one_line(&Outer::Hides(Inner::Fire)),
            "cannot read y: the disk is on fire"
        );
    }

    #[test]
    fn an_anyhow_chain_prints_each_reason_once() {
        let e = anyhow::Error::new(Outer::Says(Inner::Fire)).context("starting the agent");
        assert_eq!(
            one_line(e.as_ref()),
            "starting the agent: cannot read x: the disk is on fire"
        );
    }
}
