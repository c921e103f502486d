//! The CLI's client for the local API.

use anyhow::{Context, anyhow};
use serde_json::Value;

use crate::store::DataDir;

/// Why a CLI command failed, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The thing asked for does not exist (exit 1).
    #[error("{0}")]
    NotFound(String),
    /// Anything else (exit 2).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A connection to the daemon of one data directory.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
    dir: DataDir,
}

impl Client {
    /// Finds the running daemon of `dir`.
    pub fn connect(dir: &DataDir) -> Result<Client, ClientError> {
        if !dir.is_initialised() {
            return Err(anyhow!(
                "no node in {}: create one with `mesh init --data-dir {}`",
                dir.root().display(),
                dir.root().display()
            )
            .into());
        }
        let addr = std::fs::read_to_string(dir.api_addr()).map_err(|_| not_running(dir))?;
        // The token goes only to the daemon of this directory. After a crash `api.addr`
        // stays behind, and another local user could listen at the address it names; but
        // then no process holds the directory's LOCK, so nothing is sent.
        if !crate::store::daemon_holds_lock(dir) {
            return Err(not_running(dir));
        }
        let token = std::fs::read_to_string(dir.token())
            .with_context(|| format!("cannot read {}", dir.token().display()))?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .into();
        Ok(Client {
            base: format!("http://{}", addr.trim()),
            token: token.trim().to_owned(),
            agent,
            dir: dir.clone(),
        })
    }

    /// GET a JSON resource.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        let response = self.authorised_get(&self.agent, path)?;
        self.json(response)
    }

    /// GET a JSON resource as the type the API answers with (see `replies.rs`).
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let value = self.get(path)?;
        Ok(serde_json::from_value(value)
            .with_context(|| format!("the daemon's answer to {path} is not what this mesh expects; are the CLI and the daemon the same version?"))?)
    }

    /// Sends a JSON body with `method` and reads the answer as the type the API answers
    /// with (see `replies.rs`).
    pub fn send_as<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &Value,
    ) -> Result<T, ClientError> {
        let value = self.send(method, path, body)?;
        Ok(serde_json::from_value(value)
            .with_context(|| format!("the daemon's answer to {method} {path} is not what this mesh expects; are the CLI and the daemon the same version?"))?)
    }

    /// GET raw bytes.
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let response = self.ok(self.authorised_get(&self.agent, path)?)?;
        let mut body = response.into_body();
        Ok(body.read_to_vec().context("reading the answer")?)
    }

    /// Follows a stream of JSON lines, calling `line` for each until the stream ends.
    pub fn follow(&self, path: &str, mut line: impl FnMut(&str)) -> Result<(), ClientError> {
        use std::io::BufRead;
        // A feed stays open for ever, so it gets an agent without the global timeout.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let response = self.ok(self.authorised_get(&agent, path)?)?;
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        for text in reader.lines() {
            line(&text.context("the daemon closed the feed")?);
        }
        Ok(())
    }

    fn authorised_get(
        &self,
        agent: &ureq::Agent,
        path: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, ClientError> {
        agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .map_err(|error| self.transport(error))
    }

    /// Passes a 200 answer through; turns any other into its error.
    fn ok(
        &self,
        response: ureq::http::Response<ureq::Body>,
    ) -> Result<ureq::http::Response<ureq::Body>, ClientError> {
        if response.status() == 200 {
            return Ok(response);
        }
        Err(self
            .json(response)
            .err()
            .unwrap_or_else(|| anyhow!("unexpected answer").into()))
    }

    /// Sends a JSON body with `method`.
    pub fn send(&self, method: &str, path: &str, body: &Value) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let bytes = serde_json::to_vec(body).expect("JSON values serialise");
        if bytes.len() > crate::api::BODY_BYTES_MAX {
            // Said here rather than sent: the daemon answers 413 as soon as it sees the
            // length and closes, and a client still writing the body sees only a reset.
            return Err(anyhow!(crate::api::body_too_large()).into());
        }
        let json = "application/json";
        let result = match method {
            "PUT" => self
                .agent
                .put(url)
                .header("Authorization", auth)
                .header("Content-Type", json)
                .send(&bytes[..]),
            "POST" => self
                .agent
                .post(url)
                .header("Authorization", auth)
                .header("Content-Type", json)
                .send(&bytes[..]),
            "DELETE" => self.agent.delete(url).header("Authorization", auth).call(),
            other => return Err(anyhow!("unsupported method {other}").into()),
        };
        let response = result.map_err(|error| self.transport(error))?;
        self.json(response)
    }

    fn json(&self, response: ureq::http::Response<ureq::Body>) -> Result<Value, ClientError> {
        let status = response.status().as_u16();
        let mut body = response.into_body();
        if status == 200 {
            // An answer that cannot be read is an error, never "nothing": every list the
            // API answers is bounded (records come in pages), so this limit is far above
            // any honest answer.
            return Ok(body
                .with_config()
                .limit(ANSWER_BYTES_MAX)
                .read_json()
                .context("the daemon's answer could not be read")?);
        }
        let value: Value = body.read_json().unwrap_or(Value::Null);
        let message = value["error"]
            .as_str()
            .unwrap_or("the daemon gave no reason")
            .to_owned();
        match status {
            404 => Err(ClientError::NotFound(message)),
            // The API's own message is for HTTP clients; a CLI user needs the file.
            401 => Err(anyhow!(
                "the daemon did not accept the token in {}: was the node made again (`mesh init`) while its daemon ran? restart the daemon",
                self.dir.token().display()
            )
            .into()),
            _ => Err(anyhow!("{message} (HTTP {status})").into()),
        }
    }

    fn transport(&self, error: ureq::Error) -> ClientError {
        match error {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                not_running(&self.dir)
            }
            other => anyhow!("talking to the daemon: {other}").into(),
        }
    }
}

/// The largest answer the CLI reads from its daemon.
const ANSWER_BYTES_MAX: u64 = 256 * 1024 * 1024;

fn not_running(dir: &DataDir) -> ClientError {
    anyhow!(
        "no mesh daemon is running for {}; start one with `mesh node run --data-dir {}`",
        dir.root().display(),
        dir.root().display()
    )
    .into()
}
