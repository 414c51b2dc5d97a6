"""The records of commits other than likes, reposts, follows and blocks: posts (text, facets,
langs, reply, embed) and the rarer collections. The draws from a block's random generator come
in a fixed order, so the same seed gives the same bytes."""

from __future__ import annotations

import random
from typing import Any

from appliance.store.layout import DAY_US
from loadtest.firehose.config import (
    _REPLY_SPANS,
    COMMON_WORD,
    COMMON_WORD_FRACTION,
    DEFAULT_START_US,
    K_LISTITEM,
    K_POST,
    K_POST_UPDATE,
    K_POSTGATE,
    K_PROFILE,
    K_THREADGATE,
    K_UNKNOWN,
    RARE_WORD,
    _mix,
)
from loadtest.firehose.core import _Base
from loadtest.firehose.encoding import _blob, iso_ms, tid
from loadtest.firehose.vocabulary import (
    _ALT_TEXTS,
    _DESCRIPTIONS,
    _LINK_DOMAINS,
    _PATH_ALPHABET,
    _TITLES,
    _bisect,
    _PostText,
)


class _Records(_Base):
    """Builders of the records a commit carries."""

    def _record(
        self,
        i: int,
        t: int,
        h: int,
        kind: int,
        did_n: int,
        rkey: str,
        created_at: str,
        rng: random.Random,
    ) -> tuple[str, str, int, str, dict[str, Any]]:
        """(collection, operation, did_n, rkey, record) of the other commit kinds."""
        if kind == K_POST:
            record = self.post_record(i, h, t, created_at, rng)
            return "app.bsky.feed.post", "create", did_n, rkey, record
        if kind == K_POST_UPDATE:
            edited = self.find_post(i, h, (50_000, 1_000_000))
            if edited is not None and self.deleted_at(edited) is None:
                c = self.core(edited)
                did_n, rkey = c.did_n, c.rkey
            else:  # edit of a post from before the stream
                rkey = tid(t - 86_400_000_000 - (h >> 30) % (30 * DAY_US), h & 0x3FF)
            record = self.post_record(i, h, t, created_at, rng)
            return "app.bsky.feed.post", "update", did_n, rkey, record
        if kind == K_LISTITEM:
            collection = "app.bsky.graph.listitem"
            owner = self.did(did_n)
            list_rkey = tid(DEFAULT_START_US - (did_n % 1000) * 3_600_000_000, did_n & 0x3FF)
            record = {
                "$type": collection,
                "createdAt": created_at,
                "list": f"at://{owner}/app.bsky.graph.list/{list_rkey}",
                "subject": self.did(self.did_n_of(_mix(h ^ 0x11))),
            }
            return collection, "create", did_n, rkey, record
        if kind == K_PROFILE:
            operation = "update" if (h >> 60) else "create"
            record = self.profile_record(did_n, h, created_at, rng)
            return "app.bsky.actor.profile", operation, did_n, "self", record
        if kind in (K_THREADGATE, K_POSTGATE):
            return self._gate_record(i, h, kind, did_n, rkey, created_at)
        if kind == K_UNKNOWN:
            collection, operation, rkey, record = self.unknown_record(h, t, rkey, rng)
        else:
            collection, operation, rkey, record = self.other_bsky_record(h, t, rkey, rng)
        return collection, operation, did_n, rkey, record

    def _gate_record(
        self, i: int, h: int, kind: int, did_n: int, rkey: str, created_at: str
    ) -> tuple[str, str, int, str, dict[str, Any]]:
        """A threadgate or postgate of a post made earlier in the stream (or of its own)."""
        gated = self.find_post(i, h, (2_000, 50_000))
        if gated is not None:
            c = self.core(gated)
            did_n, rkey = c.did_n, c.rkey
        post_uri = f"at://{self.did(did_n)}/app.bsky.feed.post/{rkey}"
        if kind == K_THREADGATE:
            rules = (
                [{"$type": "app.bsky.feed.threadgate#mentionRule"}],
                [{"$type": "app.bsky.feed.threadgate#followingRule"}],
                [],
            )[h % 3]
            record = {
                "$type": "app.bsky.feed.threadgate",
                "allow": rules,
                "createdAt": created_at,
                "hiddenReplies": [],
                "post": post_uri,
            }
            return "app.bsky.feed.threadgate", "create", did_n, rkey, record
        record = {
            "$type": "app.bsky.feed.postgate",
            "createdAt": created_at,
            "detachedEmbeddingUris": [],
            "embeddingRules": [{"$type": "app.bsky.feed.postgate#disableRule"}],
            "post": post_uri,
        }
        return "app.bsky.feed.postgate", "create", did_n, rkey, record

    # records ------------------------------------------------------------------------------------

    # records ------------------------------------------------------------------------------------

    def post_record(
        self, i: int, h: int, t: int, created_at: str, rng: random.Random
    ) -> dict[str, Any]:
        # The draws from rng come in a fixed order (text, langs, embed): the same seed gives
        # the same bytes.
        text, facets, lang, external_uri = self._post_text(h, rng)
        record: dict[str, Any] = {
            "$type": "app.bsky.feed.post",
            "createdAt": created_at,
            "text": text,
        }
        if facets:
            record["facets"] = facets
        r = rng.random()
        if r < 0.93:
            record["langs"] = [lang]
        elif r < 0.97:
            record["langs"] = [lang, "en" if lang != "en" else "es"]
        reply = self._reply(i, h, t)
        if reply is not None:
            record["reply"] = reply
        embed = self._post_embed(i, h, t, rng, external_uri)
        if embed is not None:
            record["embed"] = embed
        return record

    def _post_text(
        self, h: int, rng: random.Random
    ) -> tuple[str, list[dict[str, Any]], str, str | None]:
        """(text, facets, language, external link or None) of a post: sentences of its
        language up to a length drawn from a long-tailed shape, maybe the benchmark words,
        emoji, a mention, a link and hashtags, with facets at the right UTF-8 byte offsets."""
        bank = self.bank
        r = rng.random()
        lang = bank.langs[_bisect(bank.lang_cum, r * bank.lang_cum[-1])]
        sentences = bank.sentences[lang]
        sep = "" if lang == "ja" else " "
        # Length in graphemes: many short posts, a long tail up to the 300 limit.
        shape = rng.random()
        target = (
            rng.randint(3, 60)
            if shape < 0.45
            else rng.randint(60, 200)
            if shape < 0.85
            else rng.randint(200, 300)
        )
        text_ = _PostText(sep)
        self._post_sentences(text_, h, rng, sentences, target)
        external_uri = self._post_features(text_, h, rng)
        return "".join(text_.parts), text_.facets, lang, external_uri

    def _post_sentences(
        self,
        text_: _PostText,
        h: int,
        rng: random.Random,
        sentences: list[tuple[str, int, int]],
        target: int,
    ) -> None:
        """The words of a post: maybe the benchmark words, then sentences (and now and then an
        emoji) until `target` graphemes."""
        bank = self.bank
        add = text_.add
        extras = rng.random()
        if extras < COMMON_WORD_FRACTION:
            word = COMMON_WORD if rng.random() < 0.8 else COMMON_WORD.capitalize()
            add(word, len(word), len(word))
        if _mix(h ^ 0x4A4E) % self.cfg.rare_word_every == 0:
            add(RARE_WORD, len(RARE_WORD), len(RARE_WORD))
        while text_.ngraph < target:
            # Prefer a sentence that fits the target length; a few tries, then the shortest.
            text, tb, tg = sentences[int(rng.random() * len(sentences))]
            for _ in range(3):
                if text_.ngraph + tg <= target:
                    break
                other = sentences[int(rng.random() * len(sentences))]
                if other[2] < tg:
                    text, tb, tg = other
            if not add(text, tb, tg):
                break
            if rng.random() < 0.12:
                emoji, eb = bank.emoji[int(rng.random() * len(bank.emoji))]
                add(emoji, eb, 1)

    def _post_features(self, text_: _PostText, h: int, rng: random.Random) -> str | None:
        """Maybe a mention, a link and hashtags, each with its facet; the link's URI or None."""
        bank = self.bank
        add = text_.add
        if rng.random() < 0.08:
            n = self.did_n_of(_mix(h ^ 0x3E))
            handle = "@" + self.handle(n)
            add(
                handle,
                len(handle),
                len(handle),
                {"$type": "app.bsky.richtext.facet#mention", "did": self.did(n)},
            )
        external_uri = None
        if rng.random() < 0.10:
            domain = _LINK_DOMAINS[int(rng.random() * len(_LINK_DOMAINS))]
            path = "".join(rng.choices(_PATH_ALPHABET, k=rng.randint(6, 40)))
            external_uri = f"https://{domain}{path}"
            shown = domain + path
            if len(shown) > 30:
                shown = shown[:27] + "..."
            add(
                shown,
                len(shown),
                len(shown),
                {"$type": "app.bsky.richtext.facet#link", "uri": external_uri},
            )
        if rng.random() < 0.15:
            for _ in range(1 + int(rng.random() * 3)):
                tag, tb = bank.tags[int(rng.random() * len(bank.tags))]
                add(
                    "#" + tag,
                    tb,
                    len(tag) + 1,
                    {"$type": "app.bsky.richtext.facet#tag", "tag": tag},
                )
        return external_uri

    def _reply(self, i: int, h: int, t: int) -> dict[str, Any] | None:
        """The reply reference of a post (about a third are replies), or None."""
        if (h >> 58) < 22:  # ~34% of posts are replies
            parent = self.find_post(i, h ^ 0xAE, _REPLY_SPANS)
            if parent is not None:
                puri, pcid = self.post_ref(parent)
                ruri, rcid = self.root_of(parent)
            else:
                puri, pcid = self.old_ref(h ^ 0xAE, t)
                ruri, rcid = (puri, pcid) if h & 0x80 else self.old_ref(h ^ 0xA0, t)
            return {"parent": {"cid": pcid, "uri": puri}, "root": {"cid": rcid, "uri": ruri}}
        return None

    def _post_embed(
        self, i: int, h: int, t: int, rng: random.Random, external_uri: str | None
    ) -> dict[str, Any] | None:
        """A post's embed: an external card for its link, images, a video, a quote (with or
        without media), or None."""
        embed = rng.random()
        if external_uri is not None and embed < 0.6:
            return {
                "$type": "app.bsky.embed.external",
                "external": {
                    "description": _DESCRIPTIONS[int(rng.random() * len(_DESCRIPTIONS))],
                    "thumb": _blob(rng.getrandbits(64), "image/jpeg"),
                    "title": _TITLES[int(rng.random() * len(_TITLES))],
                    "uri": external_uri,
                },
            }
        elif embed < 0.20:
            return self.images(rng)
        elif embed < 0.24:
            return {
                "$type": "app.bsky.embed.video",
                "aspectRatio": {"height": 1920, "width": 1080},
                "video": _blob(rng.getrandbits(64), "video/mp4"),
            }
        elif embed < 0.32:
            quoted = self.find_post(i, h ^ 0x9A, (50_000, 1_000_000))
            uri, cid = self.post_ref(quoted) if quoted is not None else self.old_ref(h ^ 0x9A, t)
            quote = {"$type": "app.bsky.embed.record", "record": {"cid": cid, "uri": uri}}
            if embed < 0.26:
                return {
                    "$type": "app.bsky.embed.recordWithMedia",
                    "media": self.images(rng),
                    "record": quote,
                }
            return quote
        return None

    def images(self, rng: random.Random) -> dict[str, Any]:
        images = []
        for _ in range(1 + int(rng.random() ** 3 * 4)):
            width = 400 + int(rng.random() * 3600)
            images.append(
                {
                    "alt": _ALT_TEXTS[int(rng.random() * len(_ALT_TEXTS))],
                    "aspectRatio": {"height": 300 + int(rng.random() * 3000), "width": width},
                    "image": _blob(rng.getrandbits(64), "image/jpeg"),
                }
            )
        return {"$type": "app.bsky.embed.images", "images": images}

    def profile_record(
        self, did_n: int, h: int, created_at: str, rng: random.Random
    ) -> dict[str, Any]:
        sentences = self.bank.sentences["en" if h & 1 else "pt"]
        handle = self.handle(did_n)
        return {
            "$type": "app.bsky.actor.profile",
            "avatar": _blob(h, "image/jpeg"),
            "createdAt": created_at,
            "description": sentences[int(rng.random() * len(sentences))][0],
            "displayName": handle.split(".")[0].capitalize(),
        }

    def unknown_record(
        self, h: int, t: int, rkey: str, rng: random.Random
    ) -> tuple[str, str, str, dict[str, Any]]:
        which = h % 4
        if which == 0:
            collection = "fm.teal.alpha.actor.status"
            return (
                collection,
                "update",
                "self",
                {
                    "$type": collection,
                    "expiry": iso_ms(t + 600_000_000),
                    "item": {
                        "artists": [{"artistName": "Dianna Lopez"}],
                        "duration": None,
                        "playedTime": iso_ms(t - 30_000_000),
                        "releaseName": "Sacred Sands",
                        "submissionClientAgent": "multi-scrobbler/0.14.1",
                        "trackName": "Sacred Sands",
                    },
                    "time": iso_ms(t - 400_000),
                },
            )
        if which == 1:
            collection = "fm.teal.alpha.feed.play"
            return (
                collection,
                "create",
                rkey,
                {
                    "$type": collection,
                    "artists": [{"artistName": "The Band"}],
                    "duration": 180 + h % 200,
                    "playedTime": iso_ms(t - 1_000_000),
                    "trackName": "Track " + str(h % 97),
                },
            )
        if which == 2:
            collection = "sh.tangled.feed.star"
            return (
                collection,
                "create",
                rkey,
                {
                    "$type": collection,
                    "createdAt": iso_ms(t - 300_000),
                    "subject": f"at://{self.did(self.did_n_of(h))}/sh.tangled.repo/{rkey}",
                },
            )
        collection = "com.whtwnd.blog.entry"
        text = " ".join(s[0] for s in rng.choices(self.bank.sentences["en"], k=8))
        return (
            collection,
            "create",
            rkey,
            {
                "$type": collection,
                "content": text,
                "createdAt": iso_ms(t - 300_000),
                "title": "Notes",
                "visibility": "public",
            },
        )

    def other_bsky_record(
        self, h: int, t: int, rkey: str, rng: random.Random
    ) -> tuple[str, str, str, dict[str, Any]]:
        which = h % 4
        created_at = iso_ms(t - 300_000)
        record: dict[str, Any]
        if which == 0:
            collection = "app.bsky.graph.list"
            record = {
                "$type": collection,
                "createdAt": created_at,
                "name": "Artists " + str(h % 50),
                "purpose": "app.bsky.graph.defs#curatelist",
            }
            return collection, "create", rkey, record
        if which == 1:
            collection = "app.bsky.actor.status"
            record = {
                "$type": collection,
                "createdAt": created_at,
                "durationMinutes": 240,
                "status": "app.bsky.actor.status#live",
            }
            return collection, "update", "self", record
        if which == 2:
            collection = "app.bsky.graph.starterpack"
            record = {
                "$type": collection,
                "createdAt": created_at,
                "list": f"at://{self.did(self.did_n_of(h))}/app.bsky.graph.list/{rkey}",
                "name": "Science people",
            }
            return collection, "create", rkey, record
        collection = "chat.bsky.actor.declaration"
        record = {"$type": collection, "allowIncoming": ("following", "all", "none")[h % 3]}
        return collection, "create", "self", record
