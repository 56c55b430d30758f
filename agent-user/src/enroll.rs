//! Enrolment: an agent that has no credential yet trades its one-time enrollment token
//! (`agent.enroll_token_file`, from `airlock-server tokens create --scope enroll`) for one, at
//! start, through `airlock.v1.EnrollmentService/Enroll`.
//!
//! The credential is written to `agent.token_file` atomically with mode 0600 before anything
//! else happens, and the enrollment token file is then deleted: the server has spent the token,
//! so keeping it would only leave a useless secret lying around. A credential file that exists
//! and is not empty means the host is enrolled: enrolment is skipped.

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use airlock_proto::v1::{
    enrollment_service_client::EnrollmentServiceClient, EnrollRequest, EnrollResponse, Hello,
};

use crate::{config::AgentSection, decider::Connection};

/// How long the whole Enroll call may take once connected.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why enrolment failed. Each names the file involved, and the server's reason when it refused.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Enrolment is configured without a place to keep the credential.
    #[error("agent.enroll_token_file is set but agent.token_file is not: set where the credential is kept")]
    NoCredentialFile,
    /// The credential file exists but cannot be read.
    #[error("cannot read agent.token_file {path}: {source}")]
    ReadCredential {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The enrollment token cannot be read.
    #[error(
        "agent.token_file {credential} is missing or empty, and agent.enroll_token_file {path} \
         cannot be read ({source}): put the credential or a new enrollment token \
         (`airlock-server tokens create --scope enroll`) in place"
    )]
    ReadToken {
        /// The enrollment token file.
        path: PathBuf,
        /// The missing credential file.
        credential: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The enrollment token file is empty.
    #[error("agent.enroll_token_file {0} is empty")]
    EmptyToken(PathBuf),
    /// The decider could not be reached or refused the token.
    #[error("enrolling with agent.enroll_token_file {path} at {url} failed ({code:?}): {message}")]
    Refused {
        /// The enrollment token file.
        path: PathBuf,
        /// The decider.
        url: String,
        /// The gRPC code.
        code: tonic::Code,
        /// The server's (or the transport's) reason.
        message: String,
    },
    /// The decider answered with a credential for another host.
    #[error("the decider at {url} returned a credential for host {got:?}, not {want:?}")]
    WrongHost {
        /// The decider.
        url: String,
        /// The host id the agent asked for.
        want: String,
        /// The host id of the credential.
        got: String,
    },
    /// The credential could not be written.
    #[error(
        "enrolled, but cannot write the credential to agent.token_file {path}: {source}; the \
         enrollment token is spent, so create a new one"
    )]
    WriteCredential {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What [`ensure_credential`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolment {
    /// Nothing: no enrollment token is configured, or the credential file has one already.
    Skipped,
    /// Enrolled; the credential is in `agent.token_file`.
    Enrolled {
        /// The host id the credential speaks for.
        host_id: String,
    },
}

/// Whether `path` holds a credential (exists and is not blank).
pub fn has_credential(path: &Path) -> Result<bool, EnrollError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(!text.trim().is_empty()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(EnrollError::ReadCredential {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `token` to `path` atomically (a temporary file in the same directory, synced, then
/// renamed over `path`) with mode 0600, creating the directory (mode 0700) if needed. A crash
/// leaves either no credential or the whole one, never half of it.
pub fn write_credential(path: &Path, token: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // A leftover of an earlier attempt by a process with the same pid.
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The umask may have taken bits away; make it exactly 0600.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(token.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable once the directory is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Asks the decider of `conn` for a credential, spending `token`.
pub async fn request(
    conn: &Connection,
    token: &str,
    hello: &Hello,
) -> Result<EnrollResponse, tonic::Status> {
    let mut client = EnrollmentServiceClient::new(conn.connect().await?);
    let mut req = tonic::Request::new(EnrollRequest {
        enrollment_token: token.to_owned(),
        hello: Some(hello.clone()),
    });
    req.set_timeout(ENROLL_TIMEOUT);
    Ok(client.enroll(req).await?.into_inner())
}

/// Makes sure `settings.token_file` holds a credential: when it is missing or empty and
/// `settings.enroll_token_file` is set, enrols with the decider of `conn` as `hello`, writes
/// the credential and deletes the spent enrollment token file.
pub async fn ensure_credential(
    settings: &AgentSection,
    conn: &Connection,
    hello: &Hello,
) -> Result<Enrolment, EnrollError> {
    let Some(enroll_file) = &settings.enroll_token_file else {
        return Ok(Enrolment::Skipped);
    };
    let credential = settings
        .token_file
        .as_ref()
        .ok_or(EnrollError::NoCredentialFile)?;
    if has_credential(credential)? {
        tracing::debug!(token_file = %credential.display(), "credential present; enrolment skipped");
        return Ok(Enrolment::Skipped);
    }
    let token = std::fs::read_to_string(enroll_file).map_err(|source| EnrollError::ReadToken {
        path: enroll_file.clone(),
        credential: credential.clone(),
        source,
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(EnrollError::EmptyToken(enroll_file.clone()));
    }
    tracing::info!(decider = %conn.url, host_id = %hello.host_id, enroll_token_file = %enroll_file.display(), "no credential yet; enrolling");
    let answer = request(conn, token, hello)
        .await
        .map_err(|s| EnrollError::Refused {
            path: enroll_file.clone(),
            url: conn.url.clone(),
            code: s.code(),
            message: s.message().to_owned(),
        })?;
    if answer.host_id != hello.host_id {
        return Err(EnrollError::WrongHost {
            url: conn.url.clone(),
            want: hello.host_id.clone(),
            got: answer.host_id,
        });
    }
    write_credential(credential, &answer.agent_token).map_err(|source| {
        EnrollError::WriteCredential {
            path: credential.clone(),
            source,
        }
    })?;
    // Spent: the server refuses it from now on, so it only stays around as clutter.
    if let Err(e) = std::fs::remove_file(enroll_file) {
        tracing::warn!(enroll_token_file = %enroll_file.display(), error = %e, "could not delete the spent enrollment token");
    }
    tracing::info!(host_id = %answer.host_id, token_file = %credential.display(), "enrolled; credential written");
    Ok(Enrolment::Enrolled {
        host_id: answer.host_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> AgentSection {
        AgentSection {
            token_file: Some(dir.join("creds/agent.token")),
            enroll_token_file: Some(dir.join("enroll.token")),
            ..Default::default()
        }
    }

    fn conn() -> Connection {
        // Nothing listens on port 9 of localhost: a test that reaches out fails.
        Connection {
            url: "http://127.0.0.1:9".into(),
            token: None,
            tls: None,
        }
    }

    #[test]
    fn credential_is_written_0600_atomically_in_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/agent.token");
        write_credential(&path, "alk_1_secret").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "alk_1_secret\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write_credential(&path, "alk_2_secret").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "alk_2_secret\n");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["agent.token"], "no temporary file left behind");
        assert!(has_credential(&path).unwrap());
        assert!(!has_credential(&dir.path().join("none")).unwrap());
    }

    #[tokio::test]
    async fn present_credential_or_no_enroll_file_skips_enrolment() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        write_credential(s.token_file.as_deref().unwrap(), "alk_1_x").unwrap();
        let hello = Hello::default();
        assert_eq!(
            ensure_credential(&s, &conn(), &hello).await.unwrap(),
            Enrolment::Skipped
        );
        let unset = AgentSection {
            enroll_token_file: None,
            token_file: Some(dir.path().join("absent")),
            ..Default::default()
        };
        assert_eq!(
            ensure_credential(&unset, &conn(), &hello).await.unwrap(),
            Enrolment::Skipped
        );
    }

    #[tokio::test]
    async fn failures_name_the_files_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        // A blank credential file counts as none.
        write_credential(s.token_file.as_deref().unwrap(), " ").unwrap();
        let hello = Hello {
            host_id: "h".into(),
            ..Default::default()
        };
        let err = ensure_credential(&s, &conn(), &hello).await.unwrap_err();
        assert!(matches!(err, EnrollError::ReadToken { .. }), "{err}");
        assert!(err.to_string().contains("enroll.token"), "{err}");
        std::fs::write(dir.path().join("enroll.token"), "\n").unwrap();
        let err = ensure_credential(&s, &conn(), &hello).await.unwrap_err();
        assert!(matches!(err, EnrollError::EmptyToken(_)), "{err}");
        std::fs::write(dir.path().join("enroll.token"), "alkenroll_x_y\n").unwrap();
        let err = ensure_credential(&s, &conn(), &hello).await.unwrap_err();
        assert!(
            matches!(
                err,
                EnrollError::Refused {
                    code: tonic::Code::Unavailable,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
        assert!(
            dir.path().join("enroll.token").exists(),
            "an unspent token stays"
        );
    }
}
