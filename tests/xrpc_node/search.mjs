// Pages through app.bsky.feed.searchPosts on the appliance with @atproto/api, which validates
// every response against the lexicons. Prints {uris, known_handle_posts, error} as JSON.
// Usage: node search.mjs BASE_URL WORD HANDLE
import { AtpAgent } from '@atproto/api'

const [base, word, handle] = process.argv.slice(2)
const agent = new AtpAgent({ service: base })
const uris = []
let cursor
for (;;) {
  const res = await agent.app.bsky.feed.searchPosts({ q: word, limit: 7, cursor })
  for (const post of res.data.posts) {
    if (!post.cid || !post.author.handle || typeof post.record.text !== 'string') {
      throw new Error(`incomplete PostView ${JSON.stringify(post)}`)
    }
    uris.push(post.uri)
  }
  cursor = res.data.cursor
  if (!cursor) break
}
const mine = await agent.app.bsky.feed.searchPosts({ q: `${word} from:${handle}`, limit: 100 })
let error = null
try {
  await agent.app.bsky.feed.searchPosts({ q: word, limit: 100, cursor: 'zz' })
} catch (e) {
  error = e.error
}
console.log(JSON.stringify({ uris, known_handle_posts: mine.data.posts.length, error }))
