import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import 'uplot/dist/uPlot.min.css';
import './style.css';
import { call, token, whenUnauthorized } from './api.js';
import { go, Link, useRoute } from './router.jsx';
import { Overview } from './overview.jsx';
import { Cards } from './cards.jsx';
import { Card } from './card.jsx';
import { Pool, Pools } from './pool.jsx';
import { Rule, Rules } from './rules.jsx';
import { DeadLetters } from './letters.jsx';

function Login({ next }) {
  const [value, setValue] = useState('');
  const [error, setError] = useState(null);
  async function submit(e) {
    e.preventDefault();
    try {
      // The token is checked by a read before it is kept.
      await call('GET', '/plans', undefined, value.trim());
      token.set(value.trim());
      go(next || '/', true);
    } catch (err) {
      setError(err.status === 401 ? 'That token is not accepted.' : err.message);
    }
  }
  return (
    <main class="login">
      <h1>flowcap console</h1>
      <form onSubmit={submit} data-testid="login-form">
        <label>
          API token
          <input
            type="password"
            name="token"
            autocomplete="off"
            value={value}
            onInput={(e) => setValue(e.currentTarget.value)}
          />
        </label>
        <button type="submit">Sign in</button>
        {error && <p class="error" data-testid="login-error">{error}</p>}
      </form>
      <p class="hint">The token is kept for this browser tab only (session storage).</p>
    </main>
  );
}

function App() {
  const { path, query } = useRoute();
  const signedIn = !!token.get();
  useEffect(() => {
    whenUnauthorized(() => {
      token.clear();
      // The login's own check of a typed token keeps its `next`.
      if (location.pathname === '/ui/login') return;
      go(`/login?next=${encodeURIComponent(location.pathname.slice(3) + location.search)}`, true);
    });
  }, []);
  useEffect(() => {
    if (!signedIn && path !== '/login') {
      go(`/login?next=${encodeURIComponent(path + location.search)}`, true);
    }
  }, [signedIn, path]);
  if (path === '/login') return <Login next={query.get('next')} />;
  if (!signedIn) return null;
  let page;
  let m;
  if (path === '/') page = <Overview />;
  else if (path === '/cards') page = <Cards query={query} />;
  else if ((m = path.match(/^\/cards\/([^/]+)$/))) page = <Card iccid={decodeURIComponent(m[1])} />;
  else if (path === '/pools') page = <Pools />;
  else if ((m = path.match(/^\/pools\/([^/]+)$/))) page = <Pool id={decodeURIComponent(m[1])} query={query} />;
  else if (path === '/rules') page = <Rules />;
  else if ((m = path.match(/^\/rules\/([^/]+)$/))) page = <Rule id={decodeURIComponent(m[1])} />;
  else if (path === '/dead-letters') page = <DeadLetters query={query} />;
  else page = <p>No such page.</p>;
  return (
    <>
      <header>
        <strong>flowcap</strong>
        <nav>
          <Link to="/">Overview</Link>
          <Link to="/cards">Cards</Link>
          <Link to="/pools">Pools</Link>
          <Link to="/rules">Rules</Link>
          <Link to="/dead-letters">Dead letters</Link>
        </nav>
        <button
          class="link"
          data-testid="sign-out"
          onClick={() => {
            token.clear();
            go('/login', true);
          }}
        >
          Sign out
        </button>
      </header>
      <main>{page}</main>
    </>
  );
}

render(<App />, document.getElementById('app'));
