// A real OpenID Provider (the certified `oidc-provider` package) for tests/integration/test_oidc.py.
//
// It issues client-credentials access tokens as RS256 JWTs for one resource server: `aud` is
// OIDC_AUDIENCE and each client's `tenant` rides in the token as the tenant claim. Keys come from the
// private JWKS in OIDC_KEYS_FILE; SIGHUP reads that file again and swaps in a provider with the new
// keys on the same port, which is how the test rotates keys without a restart (the first key signs).
//
// Environment: OIDC_MODULES (the node_modules `make oidc-provider` installed), OIDC_PORT, OIDC_KEYS_FILE,
// OIDC_AUDIENCE, OIDC_CLIENTS (JSON: [{client_id, client_secret, tenant, scope}]).
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`provider.mjs: ${name} is required`);
    process.exit(2);
  }
  return value;
}

// The package lives under $DETECTFLOW_HOME (installed by the Makefile), not next to this script.
const entry = createRequire(join(required('OIDC_MODULES'), 'index.js')).resolve('oidc-provider');
const { default: Provider, errors } = await import(pathToFileURL(entry).href);

const port = Number(required('OIDC_PORT'));
const issuer = `http://127.0.0.1:${port}`;
const audience = required('OIDC_AUDIENCE');
const resource = `${issuer}/resources/api`; // RFC 8707 resource indicators are absolute URIs
const clients = JSON.parse(required('OIDC_CLIENTS'));
const tenants = new Map(clients.map((c) => [c.client_id, c.tenant]));

function build() {
  const jwks = JSON.parse(readFileSync(required('OIDC_KEYS_FILE'), 'utf8'));
  return new Provider(issuer, {
    jwks,
    clients: clients.map(({ client_id, client_secret, scope }) => ({
      client_id, client_secret, scope,
      grant_types: ['client_credentials'], response_types: [], redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_post',
    })),
    scopes: ['detect:write', 'results:read', 'admin'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => resource,
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, indicator) => {
          if (indicator !== resource) throw new errors.InvalidTarget();
          return {
            scope: 'detect:write results:read admin',
            audience,
            accessTokenFormat: 'jwt',
            accessTokenTTL: 600,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    extraTokenClaims: (_ctx, token) => ({ tenant: tenants.get(token.clientId) }),
  });
}

let handler = build().callback();
const server = createServer((req, res) => handler(req, res));
server.listen(port, '127.0.0.1', () => console.log(`oidc-provider ${issuer} ready`));

process.on('SIGHUP', () => {
  try {
    handler = build().callback();
    console.log('keys reloaded');
  } catch (err) {
    console.error(`keys not reloaded: ${err}`);
  }
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
