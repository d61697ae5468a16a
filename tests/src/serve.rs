//! `hmr-worker serve` as a process, terminals that sign CDS Hooks JWTs, test certificates.

use super::*;

/// `hmr-worker serve` on a free loopback port, with the worker's configuration.
pub struct Serve {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT` (or https with TLS).
    pub base: String,
    /// A client for it (trusting the test's certificate with TLS).
    pub http: reqwest::Client,
    /// What it logged (stderr).
    pub log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hmr-worker serve` with the worker's configuration, logged in as `serve_app`: a
/// login in `hmr_his` that reads the patient and staff source views, nothing else (as README
/// says to run it). `tls_root`: the PEM certificate its `[serve] tls_cert` was issued by (the
/// client trusts it and speaks https).
pub async fn serve(w: &Workstations, tls_root: Option<&Path>) -> Result<Serve> {
    w.his
        .batch_execute(
            // Durable before it returns: the throwaway clusters commit asynchronously, and a
            // test that crashes the cluster (`Cluster::fail`) moments after serve starts lost
            // this role under load; serve then met "role does not exist" for good.
            "BEGIN; SET LOCAL synchronous_commit = on;
             DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'serve_app') THEN
                     CREATE ROLE serve_app LOGIN IN ROLE hmr_his;
                 END IF;
             END $$;
             GRANT USAGE ON SCHEMA hmr_src TO serve_app;
             GRANT SELECT ON hmr_src.patient, hmr_src.staff TO serve_app;
             COMMIT;",
        )
        .await?;
    let config = std::fs::read_to_string(&w.worker.config_path)?;
    let user = ["user=worker_app", "user=postgres"]
        .into_iter()
        .find(|u| config.contains(u))
        .context("the worker's url names its user")?;
    let config_path = w.worker.config_path.with_file_name("serve.toml");
    std::fs::write(&config_path, config.replace(user, "user=serve_app"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = std::process::Command::new(bin_dir().join("hmr-worker"))
        .arg("--config")
        .arg(&config_path)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(config_path.with_file_name("serve.log"))?)
        .spawn()?;
    let mut http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    let scheme = match tls_root {
        Some(pem) => {
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(pem)?)?);
            "https"
        }
        None => "http",
    };
    let s = Serve {
        child,
        base: format!("{scheme}://127.0.0.1:{port}"),
        http: http.build()?,
        log: config_path.with_file_name("serve.log"),
    };
    wait_until(Duration::from_secs(20), "the CDS service", || async {
        Ok(s.http.get(format!("{}/cds-services", s.base)).send().await.is_ok())
    })
    .await
    .with_context(|| std::fs::read_to_string(config_path.with_file_name("serve.log")).unwrap_or_default())?;
    Ok(s)
}

/// A terminal of `hmr-worker serve`: its P-384 key, the `[serve]` configuration naming it,
/// and CDS Hooks JWTs (ES384) signed with it.
pub struct Terminal {
    key: TerminalKey,
    pub iss: String,
    pub audience: String,
}

/// How a terminal signs: ES384 (P-384) or RS384 (RSA 2048), the two CDS Hooks recommends.
pub(crate) enum TerminalKey {
    Es384(ring::signature::EcdsaKeyPair),
    Rs384(aws_lc_rs::signature::RsaKeyPair),
}

impl Terminal {
    /// A terminal signing ES384.
    pub fn new(iss: &str, audience: &str) -> Terminal {
        use ring::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("key");
        Terminal {
            key: TerminalKey::Es384(pair),
            iss: iss.into(),
            audience: audience.into(),
        }
    }

    /// A terminal signing RS384 (an RSA key of 2048 bits).
    pub fn rsa(iss: &str, audience: &str) -> Terminal {
        let pair = aws_lc_rs::signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("key");
        Terminal {
            key: TerminalKey::Rs384(pair),
            iss: iss.into(),
            audience: audience.into(),
        }
    }

    /// `[serve]` with `audience` and `more` lines of it, then this terminal (called `name`).
    pub fn config(&self, name: &str, more: &str) -> String {
        format!(
            "[serve]\naudience = \"{}\"\n{more}\n{}",
            self.audience,
            self.entry(name)
        )
    }

    /// This terminal as a `[[serve.terminals]]` entry (its public key as a JWK).
    pub fn entry(&self, name: &str) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwk = match &self.key {
            TerminalKey::Es384(pair) => {
                use ring::signature::KeyPair as _;
                let public = pair.public_key().as_ref();
                format!(
                    "{{ kty = \"EC\", crv = \"P-384\", x = \"{}\", y = \"{}\" }}",
                    b64.encode(&public[1..49]),
                    b64.encode(&public[49..])
                )
            }
            TerminalKey::Rs384(pair) => {
                use aws_lc_rs::signature::KeyPair as _;
                let public = pair.public_key();
                format!(
                    "{{ kty = \"RSA\", n = \"{}\", e = \"{}\" }}",
                    b64.encode(public.modulus().big_endian_without_leading_zero()),
                    b64.encode(public.exponent().big_endian_without_leading_zero())
                )
            }
        };
        format!(
            "\n[[serve.terminals]]\niss = \"{}\"\nname = \"{name}\"\njwk = {jwk}\n",
            self.iss
        )
    }

    /// A fresh token (`jti` unique), valid five minutes.
    pub fn token(&self) -> String {
        self.token_with(&uuid::Uuid::new_v4().to_string())
    }

    pub fn token_with(&self, jti: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        self.sign(&json!({"iss": self.iss, "aud": self.audience, "exp": now + 300, "iat": now, "jti": jti}))
    }

    pub fn sign(&self, claims: &Value) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let alg = match self.key {
            TerminalKey::Es384(_) => "ES384",
            TerminalKey::Rs384(_) => "RS384",
        };
        let h = b64.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
        let p = b64.encode(claims.to_string());
        let message = format!("{h}.{p}");
        let sig = match &self.key {
            TerminalKey::Es384(pair) => pair
                .sign(&ring::rand::SystemRandom::new(), message.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
            TerminalKey::Rs384(pair) => {
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(
                    &aws_lc_rs::signature::RSA_PKCS1_SHA384,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    message.as_bytes(),
                    &mut sig,
                )
                .expect("sign");
                sig
            }
        };
        format!("{message}.{}", b64.encode(sig))
    }
}

/// A test CA and a server certificate it issued for 127.0.0.1 (`openssl`), PEM files in
/// `dir`: (the CA's certificate, the server's certificate, its key). (webpki refuses a CA
/// certificate as the server's own, so the server's is a separate end-entity certificate.)
pub fn test_certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let ca = dir.join("ca.crt");
    let (cert, key) = (dir.join("serve.crt"), dir.join("serve.key"));
    let ext = dir.join("leaf.ext");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
    )?;
    let steps: [Vec<std::ffi::OsString>; 3] = [
        [
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=hmr test CA",
            "-keyout",
        ]
        .iter()
        .map(Into::into)
        .chain([dir.join("ca.key").into(), "-out".into(), ca.clone().into()])
        .collect(),
        [
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ]
        .iter()
        .map(Into::into)
        .chain([key.clone().into(), "-out".into(), dir.join("serve.csr").into()])
        .collect(),
        ["x509", "-req", "-days", "2", "-set_serial", "2", "-in"]
            .iter()
            .map(Into::into)
            .chain([
                dir.join("serve.csr").into(),
                "-CA".into(),
                ca.clone().into(),
                "-CAkey".into(),
                dir.join("ca.key").into(),
                "-extfile".into(),
                ext.clone().into(),
                "-out".into(),
                cert.clone().into(),
            ])
            .collect(),
    ];
    for args in steps {
        let out = std::process::Command::new("openssl").args(&args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A private key is its owner's only: serve refuses one others can read.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok((ca, cert, key))
}
