"""Security posture report: `nodemesh posture` and the admin endpoint's /posture."""
