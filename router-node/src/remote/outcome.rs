//! What can become of one piece of work sent to an expert node, and the one rule for where it may go next.
//!
//! Every answer (or its absence) is classified once, where it is received, into [`Failure`]; [`Failure::next`] is
//! an exhaustive match on it, so that adding a code or a kind of failure is a compile error until its rule is written.
//! No decision is taken by reading a message.

use std::time::Duration;

use moe_proto::v1::{ErrorCode, ForwardError};

/// Why a piece came back without its partial sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The node's stream ended: the process died, closed it, or stopped answering HTTP/2 pings (a hung node).
    NodeDown { reason: String },
    /// The node answered with an in-stream error.
    Refused { code: ErrorCode, field: String, message: String },
    /// No answer within the message's deadline while the stream stayed up.
    Deadline { after: Duration },
    /// An answer that cannot be right (non-finite partial sums): never added in, and the node is distrusted.
    BadAnswer { message: String },
}

/// Where a failed piece may go next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Plan it again under the placement in use now, away from the node (which is marked as said).
    Elsewhere(Mark),
    /// The node and this router disagree on the placement: plan it again once this router's placement has changed
    /// (or after a short wait, when the node is the one behind).
    AfterPlacementChange,
    /// The node is full: plan it again after a short backoff, on another replica if there is one.
    Backoff,
    /// The request itself is wrong (a bug on this side): the step fails, no node would answer it differently.
    Fail,
}

/// What a failure says about the node it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// Down already (its stream ended); it is reconnected or re-placed before it is used again.
    Down,
    /// Up but not to be trusted with work while another replica exists (compute failure, hung request).
    Suspect,
}

impl Failure {
    /// Classifies an in-stream error answer.
    pub(crate) fn refused(e: ForwardError) -> Self {
        Failure::Refused {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            field: e.field,
            message: e.message,
        }
    }

    /// The rule.
    pub(crate) fn next(&self) -> Next {
        match self {
            Failure::NodeDown { .. } => Next::Elsewhere(Mark::Down),
            Failure::Deadline { .. } | Failure::BadAnswer { .. } => Next::Elsewhere(Mark::Suspect),
            Failure::Refused { code, field, .. } => match code {
                ErrorCode::FailedPrecondition if field == "epoch" => Next::AfterPlacementChange,
                // Not (or no longer) loaded there: another replica may have it, or the next placement will.
                ErrorCode::FailedPrecondition if field.starts_with("routing.experts") => Next::AfterPlacementChange,
                ErrorCode::FailedPrecondition => Next::Fail,
                ErrorCode::ResourceExhausted => Next::Backoff,
                // The node's compute failed on a valid request: try another replica, distrust the node.
                ErrorCode::Internal => Next::Elsewhere(Mark::Suspect),
                // The node is shutting down.
                ErrorCode::Unavailable => Next::Elsewhere(Mark::Down),
                // The node dropped the work unstarted because its deadline passed in its queue.
                ErrorCode::DeadlineExceeded => Next::Elsewhere(Mark::Suspect),
                ErrorCode::InvalidArgument | ErrorCode::Unspecified => Next::Fail,
            },
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NodeDown { reason } => write!(f, "node down: {reason}"),
            Failure::Refused { code, field, message } => {
                let code = code.as_str_name().trim_start_matches("ERROR_CODE_");
                if field.is_empty() {
                    write!(f, "refused ({code}): {message}")
                } else {
                    write!(f, "refused ({code}, field {field}): {message}")
                }
            }
            Failure::Deadline { after } => write!(f, "no answer within {after:?}"),
            Failure::BadAnswer { message } => write!(f, "a bad answer: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: ErrorCode, field: &str) -> Failure {
        Failure::refused(ForwardError { code: code as i32, field: field.into(), message: "m".into() })
    }

    #[test]
    fn stale_epochs_and_unloaded_experts_are_planned_again() {
        // The refusal the node sends for an epoch it does not serve: the code as the node encodes it.
        assert_eq!(refused(ErrorCode::FailedPrecondition, "epoch").next(), Next::AfterPlacementChange);
        assert_eq!(refused(ErrorCode::FailedPrecondition, "routing.experts[3]").next(), Next::AfterPlacementChange);
        assert_eq!(refused(ErrorCode::FailedPrecondition, "layer").next(), Next::Fail);
    }

    #[test]
    fn node_faults_go_elsewhere_and_mark_the_node() {
        assert_eq!(Failure::NodeDown { reason: "x".into() }.next(), Next::Elsewhere(Mark::Down));
        assert_eq!(Failure::Deadline { after: Duration::from_secs(1) }.next(), Next::Elsewhere(Mark::Suspect));
        assert_eq!(refused(ErrorCode::Internal, "").next(), Next::Elsewhere(Mark::Suspect));
        assert_eq!(Failure::BadAnswer { message: "NaN".into() }.next(), Next::Elsewhere(Mark::Suspect));
        assert_eq!(refused(ErrorCode::Unavailable, "").next(), Next::Elsewhere(Mark::Down));
        assert_eq!(refused(ErrorCode::ResourceExhausted, "").next(), Next::Backoff);
    }

    #[test]
    fn bad_requests_fail_and_unknown_codes_are_not_retried() {
        assert_eq!(refused(ErrorCode::InvalidArgument, "activations").next(), Next::Fail);
        let unknown = Failure::refused(ForwardError { code: 77, field: String::new(), message: String::new() });
        assert_eq!(unknown.next(), Next::Fail);
    }

    #[test]
    fn display_names_the_code_without_its_prefix() {
        let s = refused(ErrorCode::FailedPrecondition, "epoch").to_string();
        assert_eq!(s, "refused (FAILED_PRECONDITION, field epoch): m");
    }
}
