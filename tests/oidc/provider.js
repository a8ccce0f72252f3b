// A real OpenID Connect provider on loopback, for sluice's tests only. Never run it anywhere else:
// it has TEST-ONLY routes that hand out tokens to anyone who asks.
//
// Start:
//   node provider.js --port P [--issuer-path /realms/x] [--id-token-ttl 600]
//                    [--device-interval 5] [--device-slow-down 0] [--device-code-ttl 600]
//                    [--exit-with-stdin]
// It listens on 127.0.0.1:P with issuer http://127.0.0.1:P[/issuer-path], and prints exactly one
// line `ready <issuer>` on stdout once it accepts connections. SIGTERM or SIGINT closes it (exit 0);
// with --exit-with-stdin, so does the end of its stdin (a test harness that dies, even by SIGKILL,
// closes the pipe, so no provider outlives its test run).
//
// What it is: oidc-provider (v9) with
// - a fresh RSA-2048 key (RS256) and a P-256 key (ES256), generated at every start, with random
//   `kid`s, served as the real JWKS at the discovery document's jwks_uri;
// - accounts  ada -> ada@example.com, groups ["dba", "developers"]
//             bob -> bob@example.com, groups ["developers"];
// - clients (public, token_endpoint_auth_method none, device_code + refresh_token grants,
//   scopes "openid email groups offline_access"):
//     sluice        ID tokens signed RS256 (the one `sluice login` uses)
//     sluice-es256  ID tokens signed ES256
//     other-app     ID tokens signed RS256 (a token for someone else's audience)
// - ID tokens carry `email`, `email_verified` and `groups` (conformIdTokenClaims is off);
// - the device authorization flow, answering with `interval` = --device-interval seconds;
//   --device-slow-down N answers the first N polls of each device code with `slow_down`, as
//   IdPs do to clients that poll too fast.
//
// TEST-ONLY routes (under the issuer, JSON in and out; errors are 4xx {"error": "..."}):
//   POST {issuer}/test/device {"user_code": "WDJB-MJHT", "account": "ada"}
//        Completes the user's part of the device flow without a browser: finds the device code
//        by its user code and approves it for `account` with the scopes the device asked for
//        (a Grant is saved, as an interaction would). {"user_code": "...", "deny": true} denies
//        it instead (the device then gets access_denied). Answers {"ok": true}.
//   POST {issuer}/test/token {"account": "ada", "ttl": 600, "aud": "sluice", "extra_groups": 0}
//        Answers {"id_token": "..."}: an ID token issued by the provider's own IdToken class and
//        signed with its own key. `aud` must be one of the client ids above (default "sluice");
//        `ttl` defaults to --id-token-ttl; `extra_groups` N adds N groups
//        `directory-group-00001-of-a-large-org` ... to the account's (a large token, as a person
//        in many groups gets).
//   GET  {issuer}/test/stats
//        Answers {"jwks_requests": N}: how many times the JWKS was fetched since start.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import * as querystring from 'node:querystring';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    'issuer-path': { type: 'string', default: '' },
    'id-token-ttl': { type: 'string', default: '600' },
    'device-interval': { type: 'string', default: '5' },
    'device-slow-down': { type: 'string', default: '0' },
    'device-code-ttl': { type: 'string', default: '600' },
    'exit-with-stdin': { type: 'boolean', default: false },
  },
});

function positiveInt(name, text, { zero = false } = {}) {
  const n = Number(text);
  if (!Number.isInteger(n) || n < (zero ? 0 : 1)) {
    console.error(`--${name} must be a ${zero ? 'non-negative' : 'positive'} integer, got ${text}`);
    process.exit(2);
  }
  return n;
}

if (args.port === undefined) {
  console.error('usage: node provider.js --port P [--issuer-path /x] [--id-token-ttl S] [--device-interval S] [--device-slow-down N] [--device-code-ttl S] [--exit-with-stdin]');
  process.exit(2);
}
const port = positiveInt('port', args.port);
const idTokenTtl = positiveInt('id-token-ttl', args['id-token-ttl']);
const deviceInterval = positiveInt('device-interval', args['device-interval']);
const deviceSlowDown = positiveInt('device-slow-down', args['device-slow-down'], { zero: true });
const deviceCodeTtl = positiveInt('device-code-ttl', args['device-code-ttl']);
const issuerPath = args['issuer-path'].replace(/\/+$/, '');
if (issuerPath !== '' && !issuerPath.startsWith('/')) {
  console.error('--issuer-path must start with /');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}${issuerPath}`;

const ACCOUNTS = {
  ada: { email: 'ada@example.com', groups: ['dba', 'developers'] },
  bob: { email: 'bob@example.com', groups: ['developers'] },
};
const SCOPE = 'openid email groups offline_access';
const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';

function signingKey(type, options, alg) {
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  return {
    ...privateKey.export({ format: 'jwk' }),
    kid: crypto.randomBytes(8).toString('hex'),
    alg,
    use: 'sig',
  };
}

function publicClient(clientId, alg) {
  return {
    client_id: clientId,
    token_endpoint_auth_method: 'none',
    grant_types: [DEVICE_GRANT, 'refresh_token'],
    response_types: [],
    redirect_uris: [],
    scope: SCOPE,
    id_token_signed_response_alg: alg,
  };
}

const provider = new Provider(issuer, {
  clients: [
    publicClient('sluice', 'RS256'),
    publicClient('sluice-es256', 'ES256'),
    publicClient('other-app', 'RS256'),
  ],
  jwks: {
    keys: [
      signingKey('rsa', { modulusLength: 2048 }, 'RS256'),
      signingKey('ec', { namedCurve: 'P-256' }, 'ES256'),
    ],
  },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  scopes: ['openid', 'email', 'groups', 'offline_access'],
  // By default a token response that includes an access token puts only `sub` in the ID token
  // and leaves the rest to userinfo; sluice reads email and groups from the ID token itself.
  conformIdTokenClaims: false,
  features: {
    deviceFlow: { enabled: true },
    devInteractions: { enabled: true },
  },
  ttl: {
    IdToken: idTokenTtl,
    AccessToken: 3600,
    DeviceCode: deviceCodeTtl,
    RefreshToken: 86400,
    Grant: 86400,
    Session: 86400,
    Interaction: 600,
  },
  async findAccount(_ctx, id) {
    const account = ACCOUNTS[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id, email: account.email, email_verified: true, groups: account.groups,
        };
      },
    };
  },
});

// RFC 8628 3.2: the provider does not send `interval` itself (clients then assume 5 s).
provider.on('device_authorization.success', (_ctx, body) => {
  Object.assign(body, { interval: deviceInterval });
});

let jwksRequests = 0;
const polls = new Map(); // device_code -> polls answered so far

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function normalizeUserCode(input) {
  return String(input).toUpperCase().replace(/\W/g, '');
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new HttpError(413, 'request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function readJson(req) {
  const text = await readBody(req);
  try {
    const value = JSON.parse(text || '{}');
    if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new Error('not an object');
    return value;
  } catch (cause) {
    throw new HttpError(400, `body is not a JSON object: ${cause.message}`);
  }
}

function send(res, status, value) {
  const body = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

async function testDevice(req) {
  const body = await readJson(req);
  if (typeof body.user_code !== 'string') throw new HttpError(400, 'user_code (a string) is required');
  const code = await provider.DeviceCode.findByUserCode(normalizeUserCode(body.user_code));
  if (!code) throw new HttpError(404, `no device code has user code ${body.user_code}`);
  if (code.isExpired) throw new HttpError(409, `device code for ${body.user_code} has expired`);
  if (code.accountId || code.error) throw new HttpError(409, `device code for ${body.user_code} was already decided`);

  if (body.deny === true) {
    Object.assign(code, { error: 'access_denied', errorDescription: 'End-User denied the request' });
    await code.save();
    return { ok: true };
  }

  const accountId = body.account;
  if (typeof accountId !== 'string' || !ACCOUNTS[accountId]) {
    throw new HttpError(400, `account must be one of ${Object.keys(ACCOUNTS).join(', ')}`);
  }
  const allowed = new Set(SCOPE.split(' '));
  const requested = String(code.params?.scope ?? 'openid').split(' ').filter((s) => allowed.has(s));
  const scope = requested.join(' ');

  const grant = new provider.Grant({ accountId, clientId: code.clientId });
  grant.addOIDCScope(scope);
  const grantId = await grant.save();

  Object.assign(code, {
    accountId,
    authTime: Math.floor(Date.now() / 1000),
    grantId,
    scope,
    amr: ['test'],
  });
  await code.save();
  return { ok: true };
}

async function testToken(req) {
  const body = await readJson(req);
  const accountId = body.account ?? 'ada';
  const account = ACCOUNTS[accountId];
  if (!account) throw new HttpError(400, `account must be one of ${Object.keys(ACCOUNTS).join(', ')}`);
  const ttl = body.ttl ?? idTokenTtl;
  if (!Number.isInteger(ttl) || ttl < 1) throw new HttpError(400, 'ttl must be a positive integer');
  const aud = body.aud ?? 'sluice';
  const client = await provider.Client.find(String(aud));
  if (!client) throw new HttpError(400, `aud must be a client id of this provider (sluice, sluice-es256, other-app), got ${aud}`);

  const extra = body.extra_groups ?? 0;
  if (!Number.isInteger(extra) || extra < 0 || extra > 100000) throw new HttpError(400, 'extra_groups must be an integer from 0 to 100000');
  const groups = [...account.groups];
  for (let i = 1; i <= extra; i += 1) groups.push(`directory-group-${String(i).padStart(5, '0')}-of-a-large-org`);
  const token = new provider.IdToken({
    sub: accountId, email: account.email, email_verified: true, groups,
  }, { client });
  token.scope = 'openid email groups';
  const idToken = await token.issue({ use: 'idtoken', expiresAt: Math.floor(Date.now() / 1000) + ttl });
  return { id_token: idToken };
}

// The one place where the fixture bends the token endpoint: --device-slow-down. The body is read
// here and handed to oidc-provider as `req.body`, which it accepts for an already-read stream.
async function maybeSlowDown(req, res) {
  const text = await readBody(req);
  const form = querystring.parse(text);
  req.body = form;
  if (form.grant_type !== DEVICE_GRANT || typeof form.device_code !== 'string') return false;
  const seen = polls.get(form.device_code) ?? 0;
  polls.set(form.device_code, seen + 1);
  if (seen < deviceSlowDown) {
    send(res, 400, { error: 'slow_down', error_description: 'polling too fast (test fixture)' });
    return true;
  }
  return false;
}

const callback = provider.callback();

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, 'http://127.0.0.1');
    if (issuerPath !== '') {
      if (url.pathname !== issuerPath && !url.pathname.startsWith(`${issuerPath}/`)) {
        throw new HttpError(404, `not under the issuer path ${issuerPath}`);
      }
      // oidc-provider works out its mount path from originalUrl minus url.
      req.originalUrl = req.url;
      req.url = req.url.slice(issuerPath.length) || '/';
    }
    const path = new URL(req.url, 'http://127.0.0.1').pathname;

    if (req.method === 'POST' && path === '/test/device') return send(res, 200, await testDevice(req));
    if (req.method === 'POST' && path === '/test/token') return send(res, 200, await testToken(req));
    if (req.method === 'GET' && path === '/test/stats') return send(res, 200, { jwks_requests: jwksRequests });
    if (path === '/jwks') jwksRequests += 1;
    if (req.method === 'POST' && path === '/token' && deviceSlowDown > 0 && await maybeSlowDown(req, res)) return undefined;
    return callback(req, res);
  } catch (err) {
    if (err instanceof HttpError) return send(res, err.status, { error: err.message });
    console.error(err);
    return send(res, 500, { error: String(err?.message ?? err) });
  }
});

function shutdown(signal) {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  // Bounded: never hang a test run on a connection that refuses to close.
  setTimeout(() => {
    console.error(`provider: forced exit after ${signal}`);
    process.exit(0);
  }, 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (args['exit-with-stdin']) {
  process.stdin.on('end', () => shutdown('end of stdin'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}

server.on('error', (err) => {
  console.error(`provider: cannot listen on 127.0.0.1:${port}: ${err.message}`);
  process.exit(1);
});
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`ready ${issuer}\n`);
});
