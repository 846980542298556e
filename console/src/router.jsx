// Paths under /ui are the app's routes; links change them without a
// reload and flowcap answers index.html for any of them.
import { useEffect, useState } from 'preact/hooks';

const BASE = '/ui';

export function here() {
  const path = location.pathname.startsWith(BASE)
    ? location.pathname.slice(BASE.length) || '/'
    : '/';
  return { path, query: new URLSearchParams(location.search) };
}

export function go(to, replace = false) {
  const url = `${BASE}${to}`;
  if (replace) history.replaceState(null, '', url);
  else history.pushState(null, '', url);
  dispatchEvent(new PopStateEvent('popstate'));
}

export function useRoute() {
  const [route, setRoute] = useState(here());
  useEffect(() => {
    const on = () => setRoute(here());
    addEventListener('popstate', on);
    return () => removeEventListener('popstate', on);
  }, []);
  return route;
}

export function Link({ to, children, ...rest }) {
  return (
    <a
      href={`${BASE}${to}`}
      onClick={(e) => {
        if (e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
        e.preventDefault();
        go(to);
      }}
      {...rest}
    >
      {children}
    </a>
  );
}
