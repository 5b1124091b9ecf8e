//! A moto S3 server on a free loopback port, and an S3 client for checks, with the static
//! credentials the agent gets in tests (never the instance metadata service).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// moto's server process; stopped on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    /// Starts `moto_server` from the PATH (`scripts/test` puts `.venv/bin` with moto 5.1.22
    /// first); panics if it cannot, so a test without it fails rather than skips.
    pub fn start() -> Moto {
        Moto::start_with("moto_server").unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `cmd` as moto's server and waits until it listens.
    pub fn start_with(cmd: &str) -> Result<Moto, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let child = Command::new(cmd)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "{cmd} must be on the PATH (scripts/test installs moto[server]==5.1.22 \
                     in .venv/ and runs the tests with it): {e}"
                )
            })?;
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&addr).is_err() {
            if Instant::now() > deadline {
                return Err(format!("{cmd} did not start on {addr}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(moto)
    }

    /// A client for checks, with the same static credentials as the agent.
    pub fn client(&self) -> aws_sdk_s3::Client {
        client_for(&self.endpoint)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A path-style client for `endpoint` with static test credentials.
pub fn client_for(endpoint: &str) -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new("test", "test", None, None, "test");
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(creds)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}
